"""The mixer seam: the one interface through which rad builds, names, finds, trains and decodes the mixers
that replace attention layers.

A `MixerKind` says everything about one mixer layout: how its shape follows from the source attention, the
keys it adds to the saved Hugging Face config, how each init fills it, which checkpoint names are its own,
its decode-time state and few-token step. The rest of rad asks the registry (`rad.models.mixers`) and never
names a mixer's internals; a new layout is one module with a `MixerKind` subclass plus `register_mixer_kind`.

Shapes: batch B, tokens T, hidden size H.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
from torch import nn

from rad.errors import RadError


class MixerGeometry(Protocol):
    """The sizes of one mixer, resolved from a source config; what `rad_conversion.json` and `rad info` report."""

    def parameters(self) -> int:
        """Parameters of one mixer of this shape."""

    def record(self) -> dict:
        """The resolved settings `rad_conversion.json` keeps under `geometry` (before the parameter counts)."""


@dataclass(frozen=True)
class StateSpec:
    """One decode-time state tensor of one mixer, per sequence: `shape` excludes the batch dimension;
    `dtype` None means the model's dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class InitDefaults:
    """What an init wants around it, unless the user says otherwise: the geometry settings `rad convert`
    builds for it (the kind reads them), and the lr multiplier `rad distill` gives the mixers' gain
    parameters (`MixerKind.is_gain_parameter`)."""

    n_groups: int | str  # the kind's group setting (Mamba2: "heads", "kv" or a number)
    norm_lr_scale: float
    d_state: int | str | None = None  # the kind's state-size setting (Mamba2: None = head_dim, "half", a number)


class MixerKind(ABC):
    """One mixer layout. Instances are stateless; one per layout lives in the registry."""

    name: ClassVar[str]  # registry key and the `rad info` layer-map label, e.g. "mamba2"
    title: ClassVar[str]  # for people, e.g. "Mamba2"; its first letter marks the layer in `rad info`
    init_defaults: ClassVar[Mapping[str, InitDefaults]]  # the inits this kind knows, in the CLI's order
    layer_attribute: ClassVar[str]  # the decoder layer's attribute holding the mixer (its checkpoint infix)

    # ------------------------------------------------------------ conversion

    @property
    def inits(self) -> tuple[str, ...]:
        return tuple(self.init_defaults)

    @abstractmethod
    def settings(self, init: str, n_groups: int | str | None, d_state: int | str | None
                 ) -> tuple[int | str, int | str | None]:
        """The user's geometry settings, parsed, with the init's defaults filled in (a RadError if bad)."""

    @abstractmethod
    def resolve_geometry(self, source_config, n_groups: int | str | None, d_state: int | str | None,
                         d_conv: int) -> MixerGeometry:
        """The mixer shape replacing one attention layer of `source_config` (a RadError if it cannot fit)."""

    @abstractmethod
    def check_init(self, init: str, geometry: MixerGeometry) -> None:
        """A RadError when `init` cannot fill a mixer of `geometry`."""

    @abstractmethod
    def hf_config_fields(self, geometry: MixerGeometry, chunk_size: int) -> dict:
        """The keys this mixer sets in the hybrid's Hugging Face config (e.g. BambaConfig's mamba_*)."""

    @abstractmethod
    def initialise(self, mixer: nn.Module, attention: nn.Module, geometry: MixerGeometry, init: str,
                   generator: torch.Generator) -> None:
        """Fill a fresh `mixer` from the `attention` it replaces, drawing randomness only from `generator`."""

    def load_overrides(self, config, chunk_size: int | None, device: torch.device) -> dict:
        """`from_pretrained` keyword overrides for a saved model of `config` (none unless it holds this kind)."""
        del config, chunk_size, device
        return {}

    # ------------------------------------------------------------ checkpoint and training

    def checkpoint_prefix(self, layer: int) -> str:
        """The state-dict prefix of layer `layer`'s mixer, e.g. 'model.layers.3.mamba.'."""
        return f"model.layers.{layer}.{self.layer_attribute}."

    def is_mixer_parameter(self, name: str) -> bool:
        """Whether a parameter / state-dict name belongs to a mixer of this kind (the 'mixers' trainable set)."""
        return re.match(rf"model\.layers\.\d+\.{re.escape(self.layer_attribute)}\.", name) is not None

    @abstractmethod
    def is_gain_parameter(self, name: str) -> bool:
        """Whether a mixer parameter is an output gain, which `rad distill` trains at `norm_lr_scale` x lr."""

    # ------------------------------------------------------------ runtime

    def find(self, layer: nn.Module) -> nn.Module | None:
        """The mixer of decoder `layer` when it holds one of this kind, else None."""
        return getattr(layer, self.layer_attribute, None)

    @abstractmethod
    def owns(self, mixer: nn.Module) -> bool:
        """Whether `mixer` (a module found in a model) is of this kind."""

    @abstractmethod
    def output(self, mixer: nn.Module, normed_hidden: torch.Tensor, attention_mask: torch.Tensor | None
               ) -> torch.Tensor:
        """(B, T, H) -> (B, T, H): the mixer alone over a full sequence, as the model's forward runs it."""

    @abstractmethod
    def describe(self, mixer: nn.Module) -> dict:
        """The geometry of a built mixer, as `rad info` reports it."""

    @abstractmethod
    def describe_text(self, described: dict) -> str:
        """`describe`'s dict in a few words for `rad info`."""

    # ------------------------------------------------------------ decoding (rad.decoding.runner)

    @abstractmethod
    def state_specs(self, mixer: nn.Module) -> tuple[StateSpec, ...]:
        """The fixed-size recurrent states one sequence needs at decode time."""

    @abstractmethod
    def import_prefill_states(self, hf_cache_layer, states: tuple[torch.Tensor, ...]) -> None:
        """Copy the states the model's own forward left in `hf_cache_layer` into `states` (B, *spec.shape)."""

    @abstractmethod
    def decode_step(self, mixer: nn.Module, normed_hidden: torch.Tensor, states: tuple[torch.Tensor, ...]
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(B, T, H) for a few new tokens -> (output (B, T, H), pending). Reads `states`, never writes them:
        `pending` holds what `commit` needs to keep the state after any of the T tokens."""

    @abstractmethod
    def commit(self, states: tuple[torch.Tensor, ...], pending: tuple[torch.Tensor, ...], n: int) -> None:
        """Set `states` (in place) to the state after the first `n` tokens of the step that made `pending`."""


MIXER_KINDS: dict[str, MixerKind] = {}  # filled once, when rad.models.mixers is imported


def register_mixer_kind(kind: MixerKind) -> MixerKind:
    """Add `kind` to the registry under `kind.name` (a name may be registered once)."""
    if kind.name in MIXER_KINDS:
        raise RadError(f"A mixer kind named {kind.name!r} is already registered.")
    MIXER_KINDS[kind.name] = kind
    return kind
