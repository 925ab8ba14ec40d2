"""Checkpoint format: exact round trip, tied weights, atomic replacement, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import modlm.training.checkpoint as ckpt_mod
from modlm.config import ModelConfig
from modlm.model.transformer import MoDTransformer
from modlm.training.checkpoint import (
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    load_model,
    load_tokenizer_from_checkpoint,
    read_checkpoint_config,
    restore_rng_state,
    save_checkpoint,
)
from modlm.training.tokenizers import ByteTokenizer, load_tokenizer

T = 32


def _trained(config: ModelConfig, steps: int = 2, seed: int = 0):
    """A model and AdamW after a few steps, so the optimizer has non-trivial state."""
    torch.manual_seed(seed)
    model = MoDTransformer(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(steps):
        x = torch.randint(0, config.vocab_size, (2, T))
        model(x, x.roll(-1, 1)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


@pytest.fixture
def tiny():
    return ModelConfig.from_name("tiny")


@pytest.fixture
def saved(tmp_path, tiny):
    model, opt = _trained(tiny)
    path = save_checkpoint(
        tmp_path / "ck" / "latest", model, tiny, {"lr": 1e-3}, opt, step=2, extra_state={"note": "x"}
    )
    return path, model, opt


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------


def test_round_trip_weights_config_optimizer_rng(saved, tiny):
    path, model, opt = saved
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["config.json", "model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors"]
    )
    model2, config2, state = load_checkpoint(path)
    assert config2 == tiny
    _assert_same_state(model.state_dict(), model2.state_dict())
    assert state["step"] == 2 and state["train"] == {"lr": 1e-3} and state["extra"] == {"note": "x"}
    assert state["modlm_version"] and state["path"] == str(path)
    assert set(state["rng"]) == {"torch.cpu"}

    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"]["state_dict"])
    sd1, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd1["param_groups"] == sd2["param_groups"]  # betas come back as a tuple
    assert sd1["state"].keys() == sd2["state"].keys()
    for i in sd1["state"]:
        _assert_same_state(sd1["state"][i], sd2["state"][i])
    assert state["optimizer"]["param_names"][0] == "tok_emb.weight"


def test_tied_weights_stored_once_and_tied_after_load(saved):
    path, model, _ = saved
    stored = load_file(str(path / "model.safetensors"))
    assert "tok_emb.weight" in stored and "lm_head.weight" not in stored
    assert read_checkpoint_config(path)["tied_weights"] == {"lm_head.weight": "tok_emb.weight"}
    model2, _, _ = load_checkpoint(path)
    assert model2.lm_head.weight is model2.tok_emb.weight
    with torch.no_grad():
        model2.tok_emb.weight[0, 0] += 1.0
    assert model2.lm_head.weight[0, 0] == model2.tok_emb.weight[0, 0]


def test_loaded_model_gives_identical_logits(saved):
    path, model, _ = saved
    loaded = load_model(path)
    assert not loaded.training
    x = torch.randint(0, 256, (3, T))
    model.eval()
    with torch.no_grad():
        for routing in ("topk", "causal"):
            assert torch.equal(model(x, routing=routing).logits, loaded(x, routing=routing).logits)


def test_continued_training_matches_after_reload(saved):
    """One more optimizer step on the original and on the reloaded pair gives identical weights."""
    path, model, opt = saved
    model2, _, state = load_checkpoint(path)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"]["state_dict"])
    x = torch.randint(0, 256, (2, T))
    for m, o in ((model, opt), (model2, opt2)):
        m(x, x.roll(-1, 1)).loss.backward()
        o.step()
    _assert_same_state(model.state_dict(), model2.state_dict())


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_embeddings=False),
        dict(router="none"),
        dict(router="random"),
        dict(causal_routing="both", n_kv_heads=2),
        dict(router="none", block_kind="moe", n_experts=3, moe_capacity_factor=1.25, moe_shared_expert=True),
        dict(router="learned", block_kind="moe", routed_kind="mode-staged", n_experts=2),
        dict(router="none", block_kind="mode-integrated", n_experts=2, n_noop_experts=2),
        dict(router="none", block_kind="exit"),
        dict(router="learned", routed_kind="keys-kept", n_kv_heads=2),
    ],
)
def test_round_trip_variants(tmp_path, overrides):
    cfg = ModelConfig.from_name("tiny", **overrides)
    model, opt = _trained(cfg, steps=1)
    save_checkpoint(tmp_path / "c", model, cfg, None, opt, 1)
    model2, cfg2, state = load_checkpoint(tmp_path / "c")
    assert cfg2 == cfg and state["train"] is None
    _assert_same_state(model.state_dict(), model2.state_dict())
    assert (model2.lm_head.weight is model2.tok_emb.weight) == cfg.tie_embeddings


def test_without_optimizer_and_run_dir_lookup(tmp_path, tiny):
    model, _ = _trained(tiny, steps=0)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "latest", model, tiny, step=0)
    assert find_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "latest"
    _, _, state = load_checkpoint(tmp_path / "run")
    assert state["optimizer"] is None
    assert not (tmp_path / "run" / "checkpoints" / "latest" / "optimizer.safetensors").exists()


def test_checkpoint_bytes_are_deterministic(tmp_path, tiny):
    model, opt = _trained(tiny)
    for name in ("a", "b"):
        save_checkpoint(tmp_path / name, model, tiny, {"x": 1}, opt, 2, rng_state=capture_rng_state())
    for f in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_loading_leaves_global_rng_alone(saved):
    path, _, _ = saved
    before = torch.get_rng_state()
    load_checkpoint(path)
    load_model(path)
    assert torch.equal(before, torch.get_rng_state())


def test_rng_capture_and_restore():
    gen = torch.Generator().manual_seed(123)
    state = capture_rng_state({"data": gen})
    first = (torch.rand(4), torch.randint(0, 100, (4,), generator=gen))
    restore_rng_state(state, {"data": gen})
    second = (torch.rand(4), torch.randint(0, 100, (4,), generator=gen))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert all(t.dtype == torch.uint8 for t in state.values())


def test_step_must_be_non_negative(tmp_path, tiny):
    model, _ = _trained(tiny, steps=0)
    with pytest.raises(ValueError, match="step=-1"):
        save_checkpoint(tmp_path / "c", model, tiny, step=-1)


# --------------------------------------------------------------------------------------------
# Atomicity
# --------------------------------------------------------------------------------------------


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_crash_while_writing_keeps_previous_checkpoint(saved, tiny, monkeypatch):
    path, model, opt = saved
    real_save_file = ckpt_mod.save_file
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # model.safetensors written, optimizer.safetensors half-way: "disk full"
            with open(filename, "wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_mod, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model, tiny, None, opt, step=3)
    monkeypatch.undo()
    assert len(calls) == 2
    _, _, state = load_checkpoint(path)
    assert state["step"] == 2  # the previous checkpoint, untouched and loadable
    assert _leftovers(path.parent) == []  # the partial temp directory was removed


def test_crash_between_renames_falls_back_to_backup(saved, tiny, monkeypatch):
    """The old checkpoint is renamed away, then the process dies before the new one is renamed in."""
    path, model, opt = saved
    real_replace = os.replace
    calls = []

    def dying_replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for the process being killed right here
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, tiny, None, opt, step=3)
    monkeypatch.undo()
    assert not path.exists() and (path.parent / ".latest.old").is_dir()
    _, _, state = load_checkpoint(path)  # readers find the complete backup
    assert state["step"] == 2
    save_checkpoint(path, model, tiny, None, opt, step=4)  # the next save recovers, then replaces
    assert load_checkpoint(path)[2]["step"] == 4
    assert _leftovers(path.parent) == []


def test_stale_temp_dir_from_killed_save_is_ignored_then_removed(saved, tiny):
    path, model, opt = saved
    stale = path.parent / ".latest.tmp-999-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half a file")
    assert load_checkpoint(path)[2]["step"] == 2
    save_checkpoint(path, model, tiny, None, opt, step=5)
    assert _leftovers(path.parent) == []
    assert load_checkpoint(path)[2]["step"] == 5


def test_directory_permissions_follow_umask(saved):
    path, _, _ = saved
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o777 & ~umask)


def test_every_file_gets_the_same_mode_as_the_json(tmp_path, tiny):
    # safetensors alone writes 0600 weights beside 0644 JSON: a reader of one must read both.
    model, opt = _trained(tiny)
    old = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "ck", model, tiny, None, opt, step=1)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in path.iterdir()}
    assert set(modes) >= {"config.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors"}
    assert set(modes.values()) == {0o640}, modes


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(missing)
    assert str(missing) in _one_line(err)
    with pytest.raises(FileNotFoundError):
        load_model(missing)


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path)
    assert "not a modlm checkpoint" in _one_line(err)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "rng.safetensors"])
def test_truncated_file(saved, name):
    path, _, _ = saved
    f = path / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    msg = _one_line(err)
    assert str(f) in msg and "corrupted or not a modlm checkpoint" in msg


def test_flipped_bytes_caught_by_hash(saved):
    path, _, _ = saved
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside tensor data: safetensors itself cannot notice
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        load_model(path)
    assert str(f) in _one_line(err) and "sha256" in str(err.value)


def test_garbage_safetensors_header_without_hash_check(saved):
    path, _, _ = saved
    f = path / "model.safetensors"
    size = f.stat().st_size
    f.write_bytes(b"\xff" * size)  # same size, so only the parser can object
    with pytest.raises(ValueError) as err:
        load_checkpoint(path, verify_hash=False)
    assert str(f) in _one_line(err) and "corrupted" in str(err.value)


def test_corrupted_config_json(saved):
    path, _, _ = saved
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert str(path / "config.json") in _one_line(err)


def test_config_that_does_not_match_the_weights(saved):
    path, _, _ = saved
    manifest = json.loads((path / "config.json").read_text())
    manifest["model"]["d_mlp"] = 256
    (path / "config.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    assert "model.safetensors does not match" in _one_line(err)


def test_config_must_be_the_models_own(tmp_path, tiny):
    model, _ = _trained(tiny, steps=0)
    with pytest.raises(ValueError, match="does not match the model's own config"):
        save_checkpoint(tmp_path / "c", model, tiny.replace(d_mlp=256), step=0)
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_tiny"


def test_byte_tokenizer_by_default_and_for_old_checkpoints(saved):
    path, _, _ = saved
    assert read_checkpoint_config(path)["tokenizer"] == {"kind": "byte"}
    assert isinstance(load_tokenizer_from_checkpoint(path), ByteTokenizer)
    # Written before checkpoints carried a tokenizer: no entry at all, still bytes, still loads.
    assert "tokenizer" not in json.loads((LEGACY / "config.json").read_text())
    assert isinstance(load_tokenizer_from_checkpoint(LEGACY), ByteTokenizer)
    assert load_model(LEGACY).config.vocab_size == 256


def test_hf_tokenizer_travels_with_the_checkpoint(tmp_path, bpe_tokenizer_file):
    tok = load_tokenizer(str(bpe_tokenizer_file))
    cfg = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size)
    model, opt = _trained(cfg, steps=1)
    path = save_checkpoint(
        tmp_path / "run" / "checkpoints" / "latest", model, cfg, optimizer=opt, step=1, tokenizer=tok
    )
    manifest = read_checkpoint_config(path)
    assert manifest["tokenizer"] == tok.spec() and manifest["tokenizer"]["kind"] == "hf"
    assert (path / "tokenizer.json").read_bytes() == bpe_tokenizer_file.read_bytes()
    assert "tokenizer.json" in manifest["files"]
    for where in (path, tmp_path / "run"):  # the checkpoint, or its run directory
        again = load_tokenizer_from_checkpoint(where)
        assert again.name == tok.name and again.encode("naïve café 東京") == tok.encode("naïve café 東京")
    _assert_same_state(model.state_dict(), load_model(path).state_dict())

    # Replacing the checkpoint with a byte-tokenizer one leaves no stale tokenizer.json behind.
    byte_cfg = ModelConfig.from_name("tiny")
    save_checkpoint(path, MoDTransformer(byte_cfg), byte_cfg)
    assert not (path / "tokenizer.json").exists()
    assert isinstance(load_tokenizer_from_checkpoint(path), ByteTokenizer)


def test_corrupted_tokenizer_file(tmp_path, bpe_tokenizer_file):
    tok = load_tokenizer(str(bpe_tokenizer_file))
    cfg = ModelConfig.from_name("tiny", vocab_size=tok.vocab_size)
    path = save_checkpoint(tmp_path / "c", MoDTransformer(cfg), cfg, tokenizer=tok)
    text = (path / "tokenizer.json").read_text()
    (path / "tokenizer.json").write_text(text.replace("<|endoftext|>", "<|xxxxxxxxx|>"))
    with pytest.raises(ValueError, match="sha256") as err:
        load_tokenizer_from_checkpoint(path)
    assert str(path / "tokenizer.json") in _one_line(err)
    (path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="missing"):
        load_tokenizer_from_checkpoint(path)


def test_tokenizer_larger_than_the_vocabulary(tmp_path, tiny, bpe_tokenizer_file):
    model, _ = _trained(tiny, steps=0)
    with pytest.raises(ValueError, match="vocab_size=400 > the model's vocab_size=256"):
        save_checkpoint(tmp_path / "c", model, tiny, tokenizer=load_tokenizer(str(bpe_tokenizer_file)))
    assert not (tmp_path / "c").exists()


def test_new_kind_loads_with_its_calibrated_exit_threshold_and_same_logits(tmp_path):
    from modlm.inference.calibrate import calibrate_exit_threshold

    cfg = ModelConfig.from_name("tiny-early-exit")
    model, opt = _trained(cfg, steps=1)
    thr = calibrate_exit_threshold(model, torch.randint(0, 256, (2, T)), 0.8)
    save_checkpoint(tmp_path / "c", model, cfg, None, opt, 1)
    model2, _, _ = load_checkpoint(tmp_path / "c")
    assert float(model2.blocks[2].exit_threshold) == thr
    x = torch.randint(0, 256, (2, T))
    model.eval(), model2.eval()
    torch.testing.assert_close(model2(x, routing="causal").logits, model(x, routing="causal").logits)


def test_keys_kept_kind_loads_with_its_thresholds_and_computes_the_same(tmp_path):
    from modlm.inference.calibrate import calibrate_thresholds
    from modlm.inference.generate import generate

    cfg = ModelConfig.from_name("tiny-keys-kept")
    model, opt = _trained(cfg, steps=1)
    calibrate_thresholds(model, torch.randint(0, 256, (2, T)), 0.5)
    save_checkpoint(tmp_path / "c", model, cfg, None, opt, 1)
    model2, cfg2, _ = load_checkpoint(tmp_path / "c")
    assert cfg2.layer_types == ("dense", "keys-kept") * 2
    x = torch.randint(0, 256, (2, T))
    model.eval(), model2.eval()
    with torch.no_grad():
        for routing in ("topk", "causal"):
            assert torch.equal(model2(x, routing=routing).logits, model(x, routing=routing).logits)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert generate(model2, prompts, 8, temperature=0).tokens == generate(model, prompts, 8, temperature=0).tokens
