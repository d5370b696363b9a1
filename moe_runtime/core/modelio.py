"""Model <-> checkpoint glue: model and AdamW tensors by name, loading a model from a checkpoint
that lives in a local directory or at a storage URI (s3://, gs://, ... through pyarrow).

Names in a checkpoint: `model/<state_dict key>` and `optim/<parameter name>/<exp_avg|exp_avg_sq|step>`.
Expert tensors are stored as rows of their global [E, ...] shape, so `rows_for` slices the rows one
expert-parallel rank owns and a checkpoint written at any EP loads at any other, or in one process.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from moe_runtime.core.checkpoint import (FORMAT, MANIFEST, MAX_MANIFEST_BYTES, VERSION, Checkpoint, CheckpointError, Manifest,
                            latest_checkpoint, read_manifest, read_sealed)
from moe_runtime.core.config import RunConfig
from moe_runtime.core.footprint import check_fits
from moe_runtime.core.model import MoETransformer


def optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name: optim/<name>/exp_avg, .../exp_avg_sq, .../step."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(float(v))
            out[f"optim/{names[id(p)]}/{k}"] = t
    return out


def load_optimizer_tensors(model: nn.Module, opt: torch.optim.Optimizer,
                           get: Callable[[str, nn.Parameter], torch.Tensor | None]) -> None:
    """Restore AdamW state; get(key, param) returns the stored tensor (sliced for this rank) or None."""
    for name, p in model.named_parameters():
        state = {}
        for k in ("exp_avg", "exp_avg_sq", "step"):
            t = get(f"optim/{name}/{k}", p)
            if t is not None:
                state[k] = t.to(p.device) if k != "step" else t.float().cpu()
        if state:
            opt.state[p] = state


def load_model_state(model: nn.Module, ck: Checkpoint, rows_for: Callable[[str], slice | None] | None = None) -> None:
    """Copy model/<name> tensors into model; rows_for(name) selects a row slice (expert parallel)."""
    sd = model.state_dict()
    missing = [k for k in sd if f"model/{k}" not in ck.manifest.tensors]
    if missing:
        raise CheckpointError(f"checkpoint {ck.path} lacks model tensors {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                              f"it was written for a different model config")
    new = {}
    for k, v in sd.items():
        rows = rows_for(k) if rows_for else None
        t = ck.tensor(f"model/{k}", rows)
        if t.shape != v.shape:
            raise CheckpointError(f"checkpoint {ck.path}: {k} has shape {tuple(t.shape)}, the model expects "
                                  f"{tuple(v.shape)}")
        new[k] = t
    model.load_state_dict(new)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[MoETransformer, RunConfig, Checkpoint]:
    """A model from a checkpoint dir or a run dir (its newest valid checkpoint), local or a storage URI.
    From a URI the download is removed once the weights are loaded (see `opened_checkpoint`): the
    returned Checkpoint's manifest is there, its files are not."""
    with opened_checkpoint(path) as ck:
        run = RunConfig.from_dict(ck.manifest.config, source=str(ck.path))
        check_fits(run, torch.device("cpu"), training=False)  # built on the CPU first, whatever `device` is
        model = MoETransformer(run.model)
        load_model_state(model, ck)
    return model.to(device).eval(), run, ck


@contextlib.contextmanager
def opened_checkpoint(path: str | Path) -> Iterator[Checkpoint]:
    """The Checkpoint at `path`: a checkpoint or run directory, or a storage URI. A URI's files are
    downloaded into a temporary directory (`moe-ckpt-*` in the system temp dir, $TMPDIR) that is
    removed when the block ends, so read what you need inside it; nothing is cached between loads."""
    if not is_uri(path):
        yield Checkpoint(resolve_checkpoint(path))
        return
    with tempfile.TemporaryDirectory(prefix="moe-ckpt-") as d:
        yield Checkpoint(fetch_checkpoint(str(path), Path(d) / "checkpoint"))


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def join_uri(base: str, *parts: str) -> str:
    """base/parts..., keeping a URI's query string (e.g. ?endpoint_override=...) at the end."""
    head, q, query = base.partition("?")
    return "/".join([head.rstrip("/"), *parts]) + (q + query if q else "")


def uri_basename(uri: str) -> str:
    return uri.partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


def resolve_checkpoint(path: str | Path) -> Path:
    """A local checkpoint directory for a checkpoint or run directory, local or remote (downloaded into a
    fresh temp dir that the caller then owns and removes; `opened_checkpoint` does that for you)."""
    if is_uri(path):
        return fetch_checkpoint(str(path))
    p = Path(path)
    if (p / MANIFEST).exists():
        return p
    for root in (p / "checkpoints", p):
        last = latest_checkpoint(root)
        if last is not None:
            return last
    raise CheckpointError(f"no valid checkpoint under {p}; pass a run directory written by `moe train` "
                          f"or a checkpoint directory (step_NNNNNNNN)")


def fetch_checkpoint(uri: str, dest: str | Path | None = None, files: set[str] | None = None) -> Path:
    """Download a checkpoint (or the newest valid one of a run) from a storage URI into dest
    (default: a fresh temp dir). files: only these shard files (plus the manifest)."""
    fs, root = filesystem(uri)
    ck_path = root if _exists(fs, f"{root}/{MANIFEST}") else newest_remote_checkpoint(fs, root)
    if ck_path is None:
        raise CheckpointError(f"no checkpoint with a {MANIFEST} under {uri}")
    dest = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="moe-ckpt-"))
    dest.mkdir(parents=True, exist_ok=True)
    _download(fs, f"{ck_path}/{MANIFEST}", dest / MANIFEST)
    wanted = set(manifest_file_sizes(dest))
    for f in sorted(wanted if files is None else wanted & files):
        _download(fs, f"{ck_path}/{f}", dest / f)
    return dest


def manifest_file_sizes(local_dir: Path) -> dict[str, int]:
    """Shard file -> size the sealed manifest in local_dir names (digest and structure checked; the
    shard files themselves may still be remote, so they are checked when loaded)."""
    mf = local_dir / MANIFEST
    d = read_sealed(mf, FORMAT, VERSION, MAX_MANIFEST_BYTES)
    return {f: rec.size for f, rec in Manifest.from_dict(d, str(mf)).files.items()}


def newest_remote_checkpoint(fs, root: str) -> str | None:
    """The newest step_* directory under root whose manifest names files that all exist with their sizes."""
    import pyarrow.fs as pafs
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    steps = sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("step_"))
    for p in reversed(steps):
        with tempfile.TemporaryDirectory() as d:
            try:
                _download(fs, f"{p}/{MANIFEST}", Path(d) / MANIFEST)
                want = manifest_file_sizes(Path(d))
                have = {f: fs.get_file_info(f"{p}/{f}").size for f in want}
            except (OSError, ValueError):  # CheckpointError and DecodeError are ValueErrors
                continue
            if have == want:
                return p
    return None


def filesystem(uri: str):
    try:
        import pyarrow.fs as pafs
    except ImportError as e:
        raise ValueError(f"reading {uri} needs pyarrow ({e}); install moe-runtime[ray]") from None
    return pafs.FileSystem.from_uri(uri)


def _exists(fs, path: str) -> bool:
    import pyarrow.fs as pafs
    return fs.get_file_info(path).type == pafs.FileType.File


def _download(fs, src: str, dst: Path) -> None:
    with fs.open_input_stream(src) as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=16 * 1024 * 1024)


__all__ = ["optimizer_tensors", "load_optimizer_tensors", "load_model_state", "load_model", "opened_checkpoint",
           "resolve_checkpoint",
           "fetch_checkpoint", "is_uri", "join_uri", "uri_basename", "read_manifest"]
