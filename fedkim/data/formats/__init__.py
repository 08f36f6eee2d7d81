"""Readers and writers for the file formats of the site data directory.

Every reader raises FormatError naming the file and what is wrong, never a bare library traceback, so that the
validation gate can turn a damaged file into a finding.
"""

from pathlib import Path


class FormatError(ValueError):
    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")
