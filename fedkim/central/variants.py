"""The central model of each compared system: full FedKIM and every baseline and ablation as a `Variant` of it,
and `build_central`, the one place a central model is put together from params (rounds, the experiment harness,
the bundle loader and serving all call it)."""

from __future__ import annotations

from dataclasses import dataclass

from fedkim.central.foundation import load_foundation
from fedkim.central.m3oe import M3OEConfig
from fedkim.central.model import CentralModel, GateMode
from fedkim.config import Params
from fedkim.data.catalogue import catalogue_of
from fedkim.site.model import global_model


@dataclass(frozen=True)
class Variant:
    """How one compared system differs from full FedKIM."""

    federated: bool = True  # encoders come from the sites' federation
    pooled: bool = False  # centralised oracle: one model trained on all sites' data at the server
    experts: bool = True  # M3OE on the FM (False: projectors and encoders only)
    single_lora: bool = False  # one plain LoRA instead of the mixture
    train_encoders: bool | None = None  # None: inject.train_encoders
    use_task: bool = True
    use_modality: bool = True
    description: str = ""


VARIANTS: dict[str, Variant] = {
    "fedkim": Variant(description="full FedKIM: federated encoders injected through M3OE"),
    "no_injection": Variant(federated=False, experts=False, train_encoders=False,
                            description="FM + projectors trained on public data, untrained frozen encoders"),
    "fedplug": Variant(experts=False, description="aggregated encoders plugged in, no experts"),
    "fedplug_lora": Variant(single_lora=True, description="aggregated encoders + a single LoRA"),
    "fedkim_pub": Variant(federated=False, description="no federation: encoders and M3OE trained on public data"),
    "no_task_desc": Variant(use_task=False, description="gate without the task description"),
    "no_modality_desc": Variant(use_modality=False, description="gate without the modality description"),
    "centralized": Variant(federated=False, pooled=True, description="oracle: all site data pooled at the server"),
}


def m3oe_config(params: Params, variant: Variant) -> M3OEConfig | None:
    if not variant.experts:
        return None
    p = params.inject
    if variant.single_lora:
        return M3OEConfig(num_experts=1, rank=p.rank, alpha=p.alpha, dropout=p.dropout, scale_one=p.scale_one,
                          gate="single", lm_head=p.lm_head)
    return M3OEConfig(num_experts=p.num_experts, shared_experts=p.shared_experts, rank=p.rank, alpha=p.alpha,
                      dropout=p.dropout, scale_one=p.scale_one, gate=p.gate, top_k=p.top_k,
                      balance_weight=p.balance_weight, balance_scope=p.balance_scope, lm_head=p.lm_head,
                      gate_norm=p.gate_norm)


def build_central(params: Params, variant: Variant, encoders_state: dict | None = None, *,
                  seed: int = 0, gate_reference: dict | None = None) -> CentralModel:
    """The central model of a variant for the catalogue params select; `seed` shifts the encoders'
    initialisation (a trial of `--seeds`); gate_reference: the gate's stored reference descriptions (a bundle's)."""
    encoders = global_model(params.site, params.data, seed=params.data.seed + seed).encoders
    train_encoders = params.inject.train_encoders if variant.train_encoders is None else variant.train_encoders
    model = CentralModel(load_foundation(params.inject.foundation_model), encoders, m3oe_config(params, variant),
                         catalogue=catalogue_of(params.data), gate_mode=GateMode(variant.use_task, variant.use_modality),
                         train_encoders=train_encoders, gate_reference=gate_reference,
                         clinical_hours=params.data.icu_hours if params.inject.icu_window == "recent" else None)
    if encoders_state is not None:
        model.load_encoders(encoders_state)
    return model
