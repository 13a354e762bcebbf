"""Settings files for the orchestrators: a preset, a YAML file and `--set a.b=c` overrides, into a dataclass.

`rad run` and `rad ablate` share this loader and the per-stage settings classes (`rad.stages`), so a
default lives in one place. pydantic validates the merged mapping against the dataclass: an unknown key,
a value of the wrong type (`search.trials=abc`, `search=5`) or a number written as text (YAML reads
`1e-4` as a string; pydantic converts it) is settled here, before any work, with one sentence.

A rule about one field is its type (`PositiveInt`, `Annotated[float, Gt(0)]`, `Literal[...]` of the
choices), so pydantic enforces it and names the field; `__post_init__` keeps only rules across fields.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError

from rad.errors import RadError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
STRICT_KEYS = ConfigDict(extra="forbid")


def settings(cls=None, /, **dataclass_options):
    """A dataclass whose YAML form pydantic validates: unknown keys and wrong types are errors."""

    def wrap(cls):
        cls.__pydantic_config__ = STRICT_KEYS
        return dataclasses.dataclass(cls, **dataclass_options)

    return wrap if cls is None else wrap(cls)


MAX_SEED = 2**32 - 1  # numpy's and most samplers' seed range; torch's is wider


def check_seed(seed, name: str = "seed") -> int:
    """A seed every library rad seeds accepts: a whole number in [0, 2**32 - 1] (not a bool), else one sentence."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise RadError(f"{name} must be a whole number from 0 to {MAX_SEED}, got {seed!r}.")
    return seed


def default_of(cls, name: str):
    """The default of dataclass `cls`'s field `name` (a default factory is called), so a CLI flag or its help
    reads the one default the settings class holds instead of restating it."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            if f.default is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}.{name} has no default")
            return f.default
    raise TypeError(f"{cls.__name__} has no field {name!r}")


def preset_file(name: str, prefix: str = "") -> Path:
    """The preset `name` among `presets/<prefix><name>.yaml` (`rad run`: no prefix; `rad ablate`: 'ablate';
    `rad sweep`: 'sweep')."""
    if prefix:
        known = {("default" if p.stem == prefix else p.stem.removeprefix(f"{prefix}-")): p
                 for p in PRESETS_DIR.glob(f"{prefix}*.yaml")}
        aliases = {prefix: "default", **{p.stem: k for k, p in known.items()}}
        name = aliases.get(name, name)
    else:
        known = {p.stem: p for p in PRESETS_DIR.glob("*.yaml") if not p.stem.startswith(("ablate", "sweep"))}
    if name not in known:
        kind = {"ablate": "ablation preset", "sweep": "sweep preset"}.get(prefix, "preset")
        raise RadError(f"Unknown {kind} {name!r}; choose one of {', '.join(sorted(known))}.")
    return known[name]


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML keeps the last one
    silently, so `distill: {steps: 4}` followed by `distill: {steps: 8}` dropped the first group."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, what: str) -> dict:
    try:
        data = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.MarkedYAMLError as err:  # one sentence: the problem and its line, not PyYAML's excerpt
        line = f" (line {err.problem_mark.line + 1})" if err.problem_mark is not None else ""
        raise RadError(f"Cannot read the {what} {path}: {err.problem or err.context}{line}.") from None
    except (OSError, yaml.YAMLError) as err:
        raise RadError(f"Cannot read the {what} {path}: {getattr(err, 'strerror', None) or err}") from err
    if not isinstance(data, dict):
        raise RadError(f"The {what} {path} is not a YAML mapping of settings.")
    return data


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, recursively for nested groups."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_override(data: dict, item: str) -> dict:
    """`a.b=value` (the value parsed as YAML) into a copy of `data`."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise RadError(f"Bad override {item!r}: write key.sub=value.")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise RadError(f"Bad override {item!r}: the value is not valid YAML.") from None
    nested: dict = {}
    node = nested
    *parents, leaf = key.strip().split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = parsed
    if parents and not isinstance(_get(data, parents), (dict, type(None))):
        raise RadError(f"Bad override {item!r}: {'.'.join(parents)} is not a group of settings.")
    return merge(data, nested)


def _get(data: dict, path: list[str]):
    node = data
    for p in path:
        if not isinstance(node, dict):
            return node
        node = node.get(p)
    return node


def build(cls, data: dict, what: str):
    """`cls` from a nested mapping, validated; the first problem becomes one RadError sentence."""
    try:
        config = TypeAdapter(cls).validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        if first["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            known = _known_keys(cls, [str(p) for p in first["loc"][:-1]])
            raise RadError(f"Unknown setting {where} in the {what}; known: {', '.join(known)}.") from None
        if first["type"] == "literal_error":  # the choices, without pydantic's quotes: "must be skip or error"
            choices = first["ctx"]["expected"].replace("'", "")
            raise RadError(f"Setting {where} in the {what} must be {choices}, got {first.get('input')!r}.") \
                from None
        message = first["msg"][:1].lower() + first["msg"][1:]
        raise RadError(f"Setting {where} in the {what} is wrong: {message}, got "
                       f"{first.get('input')!r}.") from None
    _check_no_bool_became_a_number(data, config, [], what)
    return config


def _check_no_bool_became_a_number(data, built, path: list[str], what: str) -> None:
    """pydantic's lax mode reads `true` as 1 for a number field (`--set distill.steps=true` trained 1 step): a
    yes/no given where the built setting is a number is refused, wherever it sits in the tree."""
    if isinstance(data, dict):
        for key, value in data.items():
            child = built.get(key) if isinstance(built, dict) else getattr(built, str(key), None)
            _check_no_bool_became_a_number(value, child, [*path, str(key)], what)
    elif isinstance(data, bool) and not isinstance(built, bool):
        raise RadError(f"Setting {'.'.join(path)} in the {what} is a number; got the yes/no value {data!r}.")


def _known_keys(cls, path: list[str]) -> list[str]:
    for name in path:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            break
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING \
            else fields[name].default
        if not dataclasses.is_dataclass(default):
            break
        cls = type(default)
    return [f.name for f in dataclasses.fields(cls)]


def load_settings(cls, preset: Path | None = None, config_path: str | None = None, overrides=(),
                  what: str = "run config"):
    """A preset file and/or a YAML file (merged), then `key.sub=value` overrides, into `cls`."""
    data = read_yaml(preset, "preset") if preset is not None else {}
    if config_path:
        data = merge(data, read_yaml(config_path, what))
    for item in overrides:
        data = apply_override(data, item)
    return build(cls, data, what)


def to_yaml(config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
