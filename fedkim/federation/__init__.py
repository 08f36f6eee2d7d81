"""Federation: knowledge packages, admission checks, aggregation strategies and the artifact store."""

from fedkim.federation.aggregate import (
    STRATEGIES,
    AggregateResult,
    ServerOptimizerState,
    aggregate,
    fedadam,
    fedavg,
    fedprox,
    median,
    trimmed_mean,
)
from fedkim.federation.checks import CheckResult, check_package, screen_packages
from fedkim.federation.package import (
    SCHEMA_VERSION,
    KnowledgePackage,
    PackageError,
    PackageManifest,
    ValidationSummary,
    read_package,
    write_package,
)
from fedkim.federation.store import (
    ArtifactStore,
    IntegrityError,
    KeyExistsError,
    LocalStore,
    MissingKeyError,
    S3Store,
    StoreError,
    open_store,
    package_key,
    package_prefix,
)

__all__ = [
    "STRATEGIES", "AggregateResult", "ServerOptimizerState", "aggregate", "fedadam", "fedavg", "fedprox",
    "median", "trimmed_mean",
    "CheckResult", "check_package", "screen_packages",
    "SCHEMA_VERSION", "KnowledgePackage", "PackageError", "PackageManifest", "ValidationSummary",
    "read_package", "write_package",
    "ArtifactStore", "IntegrityError", "KeyExistsError", "LocalStore", "MissingKeyError", "S3Store", "StoreError",
    "open_store", "package_key", "package_prefix",
]
