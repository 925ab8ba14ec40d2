"""Checkpoints: a directory of safetensors + JSON, written atomically, read without pickle.

Layout of a checkpoint directory::

    config.json             {"format", "format_version", "modlm_version", "step", "model", "train",
                             "extra", "files": {name: {"bytes", "sha256"}}}
    model.safetensors       weights; a tied weight is stored once (see ``_dedup_state``)
    optimizer.safetensors   optimizer state tensors, keyed ``state.{param_idx}.{name}``
    optimizer.json          optimizer type, param_groups hyperparameters, param names, non-tensor state
    rng.safetensors         RNG states as uint8 tensors (torch CPU, CUDA, named generators)
    tokenizer.json          (only for a Hugging Face tokenizer) the tokenizer the model was trained with

``config.json["quant"]`` (only for a model with low-bit weights, ``modlm.quant``) is
``{module name: record}`` of every low-bit linear (``modlm.quant.model_formats``); such a
checkpoint has format_version 2, so a modlm that cannot rebuild it says so.

``config.json["tokenizer"]`` is the tokenizer's ``spec()`` ({"kind": "byte"} or {"kind": "hf",
"file", "sha256", "vocab_size"}, with "chat_template" for a chat model's); checkpoints written before it existed have no entry and mean
the byte tokenizer.

Only tensors and JSON are stored, so loading never executes code (no pickle, no ``torch.load``).

Atomicity: everything is written into a hidden sibling ``.{name}.tmp-*`` and renamed into place.
Replacing an existing checkpoint takes two renames (old -> ``.{name}.old``, new -> name); a crash
between them leaves ``.{name}.old`` complete, and both ``load_checkpoint`` and the next
``save_checkpoint`` fall back to it. A single writer per checkpoint path is assumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from modlm.config import ModelConfig
from modlm.training.tokenizers import ByteTokenizer, Tokenizer, tokenizer_from_spec

FORMAT = "modlm-checkpoint"
FORMAT_VERSION = 2  # the newest this modlm reads and writes (2: "quant")
_PLAIN_FORMAT_VERSION = 1  # written when the model has no low-bit layers, as before "quant" existed
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG_FILE = "rng.safetensors"
CONFIG_FILE = "config.json"
# Where train.py keeps the checkpoint of a run, relative to its out_dir.
RUN_CHECKPOINT = Path("checkpoints") / "latest"

__all__ = [
    "CONFIG_FILE",
    "RUN_CHECKPOINT",
    "capture_rng_state",
    "find_checkpoint",
    "load_checkpoint",
    "load_model",
    "load_tokenizer_from_checkpoint",
    "read_checkpoint_config",
    "restore_rng_state",
    "save_checkpoint",
]


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------


def capture_rng_state(
    generators: dict[str, torch.Generator] | None = None, cuda_device: torch.device | int | None = None
) -> dict[str, torch.Tensor]:
    """The RNG states a run needs to continue bit-for-bit, as uint8 CPU tensors.

    Keys: ``torch.cpu`` (the global CPU generator: the random router draws from it),
    ``torch.cuda`` (the given CUDA device's generator, only when ``cuda_device`` is given, so a
    CPU run never initialises CUDA), and ``generator.{name}`` for each named generator.
    """
    state = {"torch.cpu": torch.get_rng_state()}
    if cuda_device is not None:
        state["torch.cuda"] = torch.cuda.get_rng_state(cuda_device)
    for name, gen in (generators or {}).items():
        state[f"generator.{name}"] = gen.get_state()
    return state


def restore_rng_state(
    state: dict[str, torch.Tensor],
    generators: dict[str, torch.Generator] | None = None,
    cuda_device: torch.device | int | None = None,
) -> None:
    """Inverse of ``capture_rng_state``; a key missing from ``state`` raises KeyError naming it."""
    torch.set_rng_state(state["torch.cpu"].cpu())
    if cuda_device is not None and "torch.cuda" in state:
        torch.cuda.set_rng_state(state["torch.cuda"].cpu(), cuda_device)
    for name, gen in (generators or {}).items():
        gen.set_state(state[f"generator.{name}"].cpu())


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _corrupted(path: Path, why: str) -> ValueError:
    # One line: the underlying error may span several.
    why = " ".join(str(why).split())
    return ValueError(f"{path} is corrupted or not a modlm checkpoint ({why})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes renames durable on POSIX; directories cannot be opened this way on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(path), metadata=metadata)
    _fsync_file(path)


def _load_tensors(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error type for bad headers/offsets
        raise _corrupted(path, f"{type(e).__name__}: {e}") from None


def _tied_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{alias: kept name} for state-dict entries that are the same tensor as an earlier entry.

    The tied lm_head/tok_emb weight appears twice in ``state_dict()``; safetensors refuses
    shared memory, and storing it twice would untie it on load. The first name (``tok_emb``,
    registered before ``lm_head``) is kept.
    """
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        key = (
            t.device.type,
            t.untyped_storage().data_ptr(),
            t.storage_offset(),
            tuple(t.shape),
            tuple(t.stride()),
            t.dtype,
        )
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def _tied_parameters(model: nn.Module) -> dict[str, str]:
    """{alias: kept name} of parameters registered under two names (the tied lm_head/tok_emb)."""
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return aliases


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (``.module``) and/or torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _backup_path(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def _recover(path: Path) -> None:
    """Finish a replacement that crashed between its two renames (see module docstring)."""
    backup = _backup_path(path)
    if backup.is_dir() and not path.exists():
        os.replace(backup, path)
        _fsync_dir(path.parent)


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def _optimizer_payload(
    optimizer: torch.optim.Optimizer, model: nn.Module, sd: dict[str, Any] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten ``optimizer.state_dict()`` (or ``sd``, a full state of the same shape) into
    tensors (safetensors) and plain values (JSON)."""
    sd = optimizer.state_dict() if sd is None else sd
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    groups = []
    for g in sd["param_groups"]:
        group = {}
        for key, value in g.items():
            if torch.is_tensor(value):
                raise TypeError(f"optimizer param_group[{key!r}] is a tensor; checkpoints store plain numbers")
            group[key] = list(value) if isinstance(value, tuple) else value
        groups.append(group)
    # Names in optimizer index order: loading checks them so state cannot land on the wrong parameter.
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    param_names = [names_by_id.get(id(p), "?") for g in optimizer.param_groups for p in g["params"]]
    meta = {
        "type": type(optimizer).__name__,
        "param_groups": groups,
        "param_names": param_names,
        "non_tensor_state": scalars,
    }
    return tensors, meta


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    config: ModelConfig,
    train_config: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    extra_state: dict[str, Any] | None = None,
    rng_state: dict[str, torch.Tensor] | None = None,
    tokenizer: Tokenizer | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory at ``path`` atomically; returns ``path``.

    Args:
        path: the checkpoint directory (replaced if it exists; its parent is created).
        model: the model (DDP / torch.compile wrappers are unwrapped).
        config: the model's ModelConfig (stored as ``config.json["model"]``).
        train_config: JSON-serialisable training settings, or None.
        optimizer: its state goes to optimizer.safetensors + optimizer.json; None skips both.
        step: optimizer steps taken so far.
        extra_state: JSON-serialisable trainer state (elapsed time, tokens seen...).
        rng_state: flat dict of uint8 tensors for rng.safetensors; None captures this process's
            global CPU RNG (``capture_rng_state()``).
        tokenizer: the tokenizer whose ids the model reads; its files are written into the
            checkpoint and its ``spec()`` into ``config.json["tokenizer"]``. None is the byte tokenizer.
        model_state / optimizer_state: full state dicts to write instead of ``model.state_dict()``
            / ``optimizer.state_dict()`` (a sharded model's, gathered by
            ``modlm.training.distributed.WrappedModel.gather_state``); the files are the same.
    Raises:
        ValueError: a negative ``step``, a ``config`` different from ``model.config``, or a
            tokenizer with more ids than the model's vocabulary.
        TypeError: ``train_config`` / ``extra_state`` not JSON-serialisable.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} is invalid: must be an int >= 0")
    final = Path(path)
    _clear_the_way(final)
    # Fail on unserialisable JSON before writing anything.
    json.dumps({"train": train_config, "extra": extra_state})
    model = _unwrap(model)
    tokenizer = _check_model_and_tokenizer(model, config, tokenizer)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename; mkdir honours the umask.
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        files, aliases = _write_weights(tmp, model, model_state)
        if optimizer is not None:
            opt_tensors, opt_meta = _optimizer_payload(optimizer, model, optimizer_state)
            _save_tensors(opt_tensors, tmp / OPTIMIZER_FILE, metadata={"format": "pt"})
            _write_json(tmp / OPTIMIZER_JSON, opt_meta)
            files += [OPTIMIZER_FILE, OPTIMIZER_JSON]
        rng = capture_rng_state() if rng_state is None else rng_state
        _save_tensors(rng, tmp / RNG_FILE, metadata={"format": "pt"})
        files.append(RNG_FILE)
        files += tokenizer.save(tmp)
        _write_manifest(tmp, model, files, step, config, train_config, extra_state, aliases, tokenizer)
        _fsync_dir(tmp)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _clear_the_way(final: Path) -> None:
    """Create ``final``'s parent, finish a replacement a crash interrupted, and remove the
    leftovers of saves killed mid-write (single writer assumed, so none of them is in use)."""
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    _recover(final)
    for stale in parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _check_model_and_tokenizer(model: nn.Module, config: ModelConfig, tokenizer: Tokenizer | None) -> Tokenizer:
    """The tokenizer to save (None: bytes), once ``config`` is the model's own and the tokenizer's
    ids fit its vocabulary (ValueError otherwise)."""
    own = getattr(model, "config", None)
    if isinstance(own, ModelConfig) and own != config:
        # A manifest that disagrees with the weights would only fail later, at load time.
        raise ValueError(
            f"config={config.name!r} does not match the model's own config={own.name!r}; pass model.config"
        )
    tokenizer = ByteTokenizer() if tokenizer is None else tokenizer
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name!r} has vocab_size={tokenizer.vocab_size} > the model's "
            f"vocab_size={config.vocab_size}: its ids would index past the embedding table"
        )
    return tokenizer


def _write_weights(
    tmp: Path, model: nn.Module, model_state: dict[str, torch.Tensor] | None
) -> tuple[list[str], dict[str, str]]:
    """Write the model's weights, a tied alias once; returns the files written and the aliases
    (``{alias: stored name}``)."""
    if model_state is None:
        state = model.state_dict()
        aliases = _tied_aliases(state)
    else:  # gathered copies share no storage: tied weights are found by parameter identity
        state, aliases = model_state, _tied_parameters(model)
    weights = {k: v for k, v in state.items() if k not in aliases}
    # One metadata key: safetensors writes metadata in hash-map order, and several keys would
    # make identical weights produce different bytes from run to run.
    _save_tensors(weights, tmp / MODEL_FILE, metadata={"format": "pt"})
    return [MODEL_FILE], aliases


def _write_manifest(
    tmp: Path,
    model: nn.Module,
    files: list[str],
    step: int,
    config: ModelConfig,
    train_config: dict[str, Any] | None,
    extra_state: dict[str, Any] | None,
    aliases: dict[str, str],
    tokenizer: Tokenizer,
) -> None:
    """Write config.json (what the checkpoint holds, each file's size and hash), then give every
    file its mode."""
    from modlm import __version__
    from modlm.quant import model_formats

    quant = model_formats(model)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if quant else _PLAIN_FORMAT_VERSION,
        "modlm_version": __version__,
        "step": step,
        "model": config.to_dict(),
        "train": train_config,
        "extra": extra_state or {},
        "tied_weights": aliases,  # {alias: stored name}; the alias is restored by tying, not copying
        "tokenizer": tokenizer.spec(),
        **({"quant": quant} if quant else {}),
        # Sizes catch truncation, hashes catch flipped bytes safetensors cannot see.
        "files": {f: {"bytes": (tmp / f).stat().st_size, "sha256": _sha256(tmp / f)} for f in files},
    }
    _write_json(tmp / CONFIG_FILE, manifest)
    # safetensors creates its files 0600; every file gets the mode open() gave the JSON
    # (0666 minus the umask), so whoever may read the config may read the weights.
    mode = stat.S_IMODE((tmp / CONFIG_FILE).stat().st_mode)
    for name in files:
        os.chmod(tmp / name, mode)


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` directory to ``final``, keeping the old one until it is there."""
    backup = _backup_path(final)
    if backup.exists():  # a stale backup (``final`` exists: _recover ran first)
        shutil.rmtree(backup)
    if final.exists():
        os.replace(final, backup)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(backup)
    else:
        os.replace(tmp, final)
        _fsync_dir(final.parent)


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory for ``path``: the directory itself, or a run's ``checkpoints/latest``.

    Falls back to the ``.{name}.old`` backup when a save crashed between its two renames.
    Raises FileNotFoundError (one line, naming the path) when there is none.
    """
    p = Path(path).expanduser()
    for cand in (p, p / RUN_CHECKPOINT):
        if (cand / CONFIG_FILE).is_file():
            return cand
        backup = _backup_path(cand)
        if not cand.exists() and (backup / CONFIG_FILE).is_file():
            return backup
    if not p.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {p}")
    if p.is_dir() and not any(p.iterdir()):
        raise FileNotFoundError(f"checkpoint directory is empty: {p}")
    raise ValueError(f"{p} is not a modlm checkpoint (no {CONFIG_FILE} in it or in {p / RUN_CHECKPOINT})")


def read_checkpoint_config(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed, checked ``config.json`` of a checkpoint (no tensors are read)."""
    ckpt = find_checkpoint(path)
    cfg_path = ckpt / CONFIG_FILE
    try:
        manifest = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupted(cfg_path, f"{type(e).__name__}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _corrupted(cfg_path, f'missing "format": "{FORMAT}"')
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{cfg_path} has format_version={manifest.get('format_version')}; this modlm reads "
            f"<= {FORMAT_VERSION} (upgrade modlm)"
        )
    for key in ("model", "step", "files"):
        if key not in manifest:
            raise _corrupted(cfg_path, f"no {key!r} entry")
    manifest["path"] = str(ckpt)
    return manifest


def _check_file(ckpt: Path, manifest: dict[str, Any], name: str, verify_hash: bool) -> Path:
    path = ckpt / name
    rec = manifest["files"].get(name)
    if rec is None:
        raise _corrupted(path, f"not listed in {CONFIG_FILE}")
    if not path.is_file():
        raise _corrupted(path, "file is missing")
    size = path.stat().st_size
    if size != rec["bytes"]:
        raise _corrupted(path, f"{size} bytes, expected {rec['bytes']}: truncated or overwritten")
    if verify_hash and _sha256(path) != rec["sha256"]:
        raise _corrupted(path, "sha256 mismatch")
    return path


def _build_model(
    config: ModelConfig, ckpt: Path, manifest: dict[str, Any], device: str | torch.device, verify_hash: bool
) -> nn.Module:
    from modlm.model.transformer import MoDTransformer
    from modlm.quant import apply_formats

    path = _check_file(ckpt, manifest, MODEL_FILE, verify_hash)
    weights = _load_tensors(path)
    # Construction draws the init from the global RNG; loading must not perturb a caller's RNG.
    with torch.random.fork_rng(devices=[]):
        model = MoDTransformer(config)
    try:  # the low-bit layers the weights were written from, empty until loaded
        apply_formats(model, manifest.get("quant") or {})
    except ValueError as e:
        raise _corrupted(ckpt / CONFIG_FILE, str(e)) from None
    tied = set(_tied_aliases(model.state_dict()))
    try:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ValueError(f"{path} does not match its config.json model: {' '.join(str(e).split())}") from None
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match its config.json model: missing {missing[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return model.to(device)


def _load_optimizer(ckpt: Path, manifest: dict[str, Any], verify_hash: bool) -> dict[str, Any] | None:
    if OPTIMIZER_FILE not in manifest["files"]:
        return None
    tensors = _load_tensors(_check_file(ckpt, manifest, OPTIMIZER_FILE, verify_hash))
    meta_path = _check_file(ckpt, manifest, OPTIMIZER_JSON, verify_hash)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
        for key, value in meta["non_tensor_state"].items():
            idx, name = key.split(".", 1)
            state.setdefault(int(idx), {})[name] = value
        # JSON turned tuples (AdamW's betas) into lists; "params" is a list in torch too.
        groups = [
            {k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
            for g in meta["param_groups"]
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise _corrupted(meta_path, f"{type(e).__name__}: {e}") from None
    return {
        "state_dict": {"state": state, "param_groups": groups},
        "type": meta.get("type"),
        "param_names": meta.get("param_names"),
    }


def load_checkpoint(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    verify_hash: bool = True,
) -> tuple[nn.Module, ModelConfig, dict[str, Any]]:
    """Load a checkpoint directory (or a run directory holding ``checkpoints/latest``).

    Returns:
        (model, config, state): the model on ``device`` in train mode, its ModelConfig, and
        ``state`` = {"step", "train" (dict | None), "extra" (dict), "modlm_version", "path",
        "optimizer" (None or {"state_dict": for ``optimizer.load_state_dict``, "type",
        "param_names"}), "rng" (dict of uint8 tensors for ``restore_rng_state``)}.
    Raises:
        FileNotFoundError: no such directory (one line naming it).
        ValueError: a file is truncated, corrupted, or does not match the config (names the file).
    """
    model, config, manifest, ckpt = _read_model(path, device, verify_hash)
    rng = _load_tensors(_check_file(ckpt, manifest, RNG_FILE, verify_hash)) if RNG_FILE in manifest["files"] else {}
    state = {
        "step": int(manifest["step"]),
        "train": manifest.get("train"),
        "extra": manifest.get("extra") or {},
        "modlm_version": manifest.get("modlm_version"),
        "path": str(ckpt),
        "optimizer": _load_optimizer(ckpt, manifest, verify_hash),
        "rng": rng,
    }
    return model, config, state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", verify_hash: bool = True) -> nn.Module:
    """Just the model of a checkpoint (or run directory), in eval mode; optimizer/RNG files are not read."""
    return _read_model(path, device, verify_hash)[0].eval()


def load_tokenizer_from_checkpoint(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer a checkpoint (or run directory) was saved with; the byte tokenizer when it names none.

    Raises:
        FileNotFoundError: no such directory (one line naming it).
        ValueError: the tokenizer's file is missing or differs from its recorded sha256, or its kind
            is unknown.
    """
    manifest = read_checkpoint_config(path)
    spec = manifest.get("tokenizer")
    if spec is None:  # written before checkpoints carried their tokenizer: those all used bytes
        return ByteTokenizer()
    # The spec of a tokenizer with files carries their hash, so the tokenizer checks them itself.
    return tokenizer_from_spec(spec, Path(manifest["path"]))


def _read_model(
    path: str | os.PathLike, device: str | torch.device, verify_hash: bool
) -> tuple[nn.Module, ModelConfig, dict[str, Any], Path]:
    """The model, its config, the checked manifest and the checkpoint directory."""
    manifest = read_checkpoint_config(path)
    ckpt = Path(manifest["path"])
    try:
        config = ModelConfig.from_dict(manifest["model"])
    except (TypeError, ValueError) as e:
        raise _corrupted(ckpt / CONFIG_FILE, f"bad model config: {e}") from None
    return _build_model(config, ckpt, manifest, device, verify_hash), config, manifest, ckpt
