"""Where a command may write: every `--out` is checked here before any work, so nothing a user types loses data.

An output folder must be a folder (not a file, not inside a file) that this process can create and write
(probed by making and removing one empty folder); it must not be, contain, or lie inside any of the
command's inputs (`rad distill H --out H` would overwrite the hybrid's config.json); and when it already
holds anything, that must be this command's own earlier output, recognised by its record file
(`OutputKind.owns`): a resume continues it, `--overwrite` may replace it, but a folder of someone else's
files is never written into or deleted. The one documented overlap (a `rad ablate` reading the search it
ran itself into OUT/search) is passed as `allowed`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from rad.errors import RadError
from rad.model_aliases import ALIASES, alias_cache_folder


def _any_of(*names: str) -> Callable[[Path], bool]:
    return lambda folder: any((folder / n).exists() for n in names)


def _mapping_with(name: str, keys: set[str], loads) -> Callable[[Path], bool]:
    """A file `name` that parses to a mapping holding all of `keys` (what rad writes there, not a stranger's)."""

    def owns(folder: Path) -> bool:
        try:
            data = loads((folder / name).read_text())
        except (OSError, ValueError, yaml.YAMLError):
            return False
        return isinstance(data, dict) and keys <= set(data)

    return owns


def _eval_folder(folder: Path) -> bool:
    if (folder / "comparison.md").is_file():
        return True
    return any(child.is_dir() and ((child / "results.json").is_file() or any(child.glob("*.meta.json")))
               for child in folder.iterdir())


@dataclass(frozen=True)
class OutputKind:
    """What a command's output folder looks like: `owns(folder)` is true for a folder it wrote."""

    command: str
    record: str  # named in the refusal: the file that marks the folder as this command's
    owns: Callable[[Path], bool]


CONVERT = OutputKind("rad convert", "rad_conversion.json", _any_of("rad_conversion.json"))
SEARCH = OutputKind("rad search", "search.json or study.db",
                    _any_of("study.db", "search.json", "objective_comparison.json"))
DISTILL = OutputKind("rad distill", "log.jsonl, checkpoints/ or its config.json",
                     lambda f: _any_of("log.jsonl", "checkpoints", "summary.json")(f)
                     or _mapping_with("config.json", {"hybrid", "out", "train", "steps"}, json.loads)(f))
ALIGN = OutputKind("rad align", "align_config.json", _any_of("align_config.json"))
EXPORT_VLLM = OutputKind("rad export --format vllm", "rad_export.json", _any_of("rad_export.json"))
EVAL = OutputKind("rad eval", "comparison.md or <model>/<task>.meta.json", _eval_folder)
RUN = OutputKind("rad run", "config.yaml", _mapping_with("config.yaml", {"model", "search", "distill", "eval"},
                                                        yaml.safe_load))
SWEEP = OutputKind("rad sweep", "sweep.yaml", _mapping_with("sweep.yaml", {"model", "ks", "search", "distill"},
                                                          yaml.safe_load))
ABLATE = OutputKind("rad ablate", "config.yaml", _mapping_with("config.yaml", {"model", "baseline", "inits"},
                                                              yaml.safe_load))


def input_location(spec: str | os.PathLike | None) -> Path | None:
    """The file or folder an input spec reads (an alias: its cache folder); None for hub ids and nothing."""
    if spec is None or str(spec) == "":
        return None
    if str(spec) in ALIASES:
        return alias_cache_folder(str(spec))
    path = Path(spec).expanduser()
    return path if path.exists() else None


def existing_ancestor(path: str | os.PathLike) -> Path:
    """`path` itself if it exists, else its nearest existing parent (what a write there would land in)."""
    ancestor = Path(path).expanduser()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def check_writable(out: Path, option: str = "--out") -> None:
    """`out` is or can become a folder this process writes to; checked by creating and removing an empty one."""
    if out.exists() and not out.is_dir():
        raise RadError(f"{option} {out} is a file, not a folder; give the path of a folder to write to.")
    ancestor = existing_ancestor(out)
    if not ancestor.is_dir():
        raise RadError(f"{option} {out} lies inside {ancestor}, which is a file; give a folder path.")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rad-write-probe-", dir=ancestor))
    except OSError as err:
        raise RadError(f"{option} {out} cannot be written ({ancestor}: {err.strerror or err}); choose a folder "
                       "you can write to.") from None


def check_apart(out: Path, inputs: Iterable[tuple[str, str | os.PathLike | None]], option: str = "--out",
                allowed: Iterable[str | os.PathLike] = ()) -> None:
    """`out` is not, does not contain, and is not inside any input (`allowed`: documented exceptions)."""
    resolved = out.expanduser().resolve()
    exempt = {Path(a).expanduser().resolve() for a in allowed}
    for role, spec in inputs:
        location = input_location(spec)
        if location is None:
            continue
        where = location.resolve()
        if where in exempt:
            continue
        if where == resolved:
            raise RadError(f"{option} {out} is the {role} {spec} itself; writing there would change an input: "
                           "choose another folder.")
        if where in resolved.parents:
            raise RadError(f"{option} {out} lies inside the {role} {spec}; writing there would change an input: "
                           "choose a folder outside it.")
        if resolved in where.parents:
            raise RadError(f"{option} {out} contains the {role} {spec}; choose a folder that holds none of the "
                           "inputs.")


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_free_space(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse to start work that will write `needed` bytes into `folder` when its disk has less free: a full disk
    found hours into a run would end it at a checkpoint write instead."""
    free = shutil.disk_usage(existing_ancestor(folder)).free
    if free < needed:
        raise RadError(f"{what} needs about {_size(needed)} in {folder}, but its disk has {_size(free)} free; free "
                       "some space or choose an --out on another disk.")


def write_failed(path: str | os.PathLike, err: BaseException, advice: str) -> RadError:
    """A failed write as one sentence, naming the disk's free space (a full disk is the usual cause)."""
    free = shutil.disk_usage(existing_ancestor(path)).free
    reason = getattr(err, "strerror", None) or str(err).splitlines()[0][:120]
    return RadError(f"Could not write {path} ({reason}; {_size(free)} free on its disk); {advice}")


def check_output(out: str | os.PathLike, kind: OutputKind, *,
                 inputs: Iterable[tuple[str, str | os.PathLike | None]] = (), option: str = "--out",
                 allowed: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output folder that would lose data or fail late (one RadError sentence); writes nothing."""
    out = Path(out).expanduser()
    check_writable(out, option)
    check_apart(out, inputs, option, allowed)
    if out.is_dir() and any(out.iterdir()) and not kind.owns(out):
        raise RadError(f"{option} {out} already holds files that {kind.command} did not write (no "
                       f"{kind.record}); rad never writes into or replaces such a folder: choose a new or empty one.")
    return out
