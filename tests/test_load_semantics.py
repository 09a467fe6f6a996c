"""What ``zarrckpt.load`` does with the target (issue 11, items 2, 3, 4 and 7).

Meta-device targets are materialized or refused, never left on meta; plain
value containers take the stored structure; optimizer state follows the
checkpoint as in ``Optimizer.load_state_dict``; a failing load leaves the
target untouched; ``load`` returns the missing and unexpected keys.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import _load_semantics_cases as cases
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import zarrckpt
from zarrckpt.errors import (
    CorruptCheckpointError,
    MissingKeysError,
    ShapeMismatchError,
    StateDictMismatchError,
    UnsupportedValueError,
)
from zarrckpt.testing import run_distributed


def _net(seed: int, device: str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    with torch.device(device):
        return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


# --------------------------------------------------------------------------- item 2: meta


@pytest.mark.parametrize("source", ["dir", "safetensors", "torch_save"])
def test_meta_module_is_materialized(tmp_path: Any, source: str) -> None:
    """A module built on meta gets the stored values: parameters stay parameters
    with their requires_grad, buffers are filled, nothing is left on meta."""
    src = _net(seed=1)
    src[0].bias.requires_grad_(False)
    reference = {k: v.detach().clone() for k, v in src.state_dict().items()}
    if source == "dir":
        path = str(tmp_path / "ckpt")
        zarrckpt.save({"model": src}, path)
    elif source == "safetensors":
        path = str(tmp_path / "model.safetensors")
        save_file(reference, path)
    else:
        path = str(tmp_path / "model.pt")
        torch.save(reference, path)
    model = _net(seed=0, device="meta")
    model[0].bias.requires_grad_(False)
    zarrckpt.load({"model": model} if source == "dir" else model, path)

    assert [k for k, t in _tensors(model) if t.is_meta] == []
    for name, p in model.named_parameters():
        assert isinstance(p, nn.Parameter), name
        assert p.requires_grad == (name != "0.bias"), name
    for name, t in model.state_dict().items():
        assert t.device.type == "cpu" and torch.equal(t, reference[name]), name
    model(torch.randn(2, 4)).sum().backward()  # a working module
    assert model[0].weight.grad is not None and model[0].bias.grad is None


def test_meta_bf16_target_from_fp32_checkpoint(tmp_path: Any) -> None:
    """Meta targets of another dtype get the stored values cast to their dtype
    (a dict of meta tensors and a meta module)."""
    src = _net(seed=2)
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"model": src}, path)
    expected = {k: v.to(torch.bfloat16) for k, v in src.state_dict().items()}
    expected["1.num_batches_tracked"] = src.state_dict()["1.num_batches_tracked"]

    model = _net(seed=0, device="meta").to(torch.bfloat16)
    zarrckpt.load({"model": model}, path)
    for name, t in model.state_dict().items():
        assert t.dtype == expected[name].dtype and torch.equal(t, expected[name]), name

    target = {"model": _net(seed=0, device="meta").to(torch.bfloat16).state_dict()}
    zarrckpt.load(target, path)
    for name, t in target["model"].items():
        assert t.dtype == expected[name].dtype and torch.equal(t, expected[name]), name


def test_meta_parameter_in_a_dict_stays_a_parameter(tmp_path: Any) -> None:
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"w": torch.arange(6.0), "b": torch.ones(2)}, path)
    frozen = nn.Parameter(torch.empty(2, device="meta"), requires_grad=False)
    target = {"w": nn.Parameter(torch.empty(6, device="meta")), "b": frozen}
    zarrckpt.load(target, path)
    assert isinstance(target["w"], nn.Parameter) and target["w"].requires_grad
    assert isinstance(target["b"], nn.Parameter) and not target["b"].requires_grad
    assert torch.equal(target["w"], torch.arange(6.0)) and torch.equal(target["b"], torch.ones(2))


def test_meta_key_missing_from_the_checkpoint_raises_even_with_strict_false(
    tmp_path: Any,
) -> None:
    """strict=False skips missing keys, but a skipped meta tensor would stay on meta:
    the load raises naming it, and modifies nothing."""
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"w": torch.arange(6.0)}, path)
    meta_w, meta_extra = torch.empty(6, device="meta"), torch.empty(3, device="meta")
    target = {"w": meta_w, "extra": meta_extra}
    with pytest.raises(MissingKeysError, match="meta device") as info:
        zarrckpt.load(target, path, strict=False)
    assert info.value.missing == ["extra"]
    assert target["w"] is meta_w and target["extra"] is meta_extra

    model = _net(seed=0, device="meta")
    with pytest.raises(MissingKeysError, match="meta device"):
        zarrckpt.load({"model": model}, path, strict=False)
    assert all(t.is_meta for _, t in _tensors(model))


class _CopyingStateful:
    """A Stateful whose load_state_dict copies into its tensors (no assign)."""

    def __init__(self) -> None:
        self.w = torch.empty(6, device="meta")

    def state_dict(self) -> dict[str, Any]:
        return {"w": self.w}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.w.copy_(sd["w"])  # a no-op on meta


def test_stateful_that_keeps_meta_tensors_raises(tmp_path: Any) -> None:
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"obj": {"w": torch.arange(6.0)}}, path)
    with pytest.raises(UnsupportedValueError, match=r"'obj'.*meta device.*\['obj.w'\]"):
        zarrckpt.load({"obj": _CopyingStateful()}, path)


# --------------------------------------------------------------------------- item 3: plain


def test_plain_containers_take_the_stored_structure(tmp_path: Any) -> None:
    path = str(tmp_path / "ckpt")
    stored = {
        "losses": [0.5, 0.4, 0.3],
        "cfg": {"lr": 0.1, "betas": (0.9, 0.95), "names": ["a", "b"]},
        "pair": (1, 2, 3),
        "mixed": [torch.zeros(2), torch.ones(2)],
        "w": torch.arange(3.0),
    }
    zarrckpt.save(stored, path)
    for start in ([], [9.0], [1.0, 2.0, 3.0, 4.0]):
        losses = list(start)
        target = {"losses": losses, "cfg": {"lr": 1.0}, "pair": (), "w": torch.zeros(3)}
        result = zarrckpt.load(target, path)  # strict=True
        assert target["losses"] == [0.5, 0.4, 0.3] and target["losses"] is losses
        # dicts are matched key by key (as DCP does): the target chooses the keys
        assert target["cfg"] == {"lr": 0.1}
        assert target["pair"] == (1, 2, 3)
        assert result.unexpected_keys == [
            "cfg.betas.0",
            "cfg.betas.1",
            "cfg.names.0",
            "cfg.names.1",
            "mixed.0",
            "mixed.1",
        ]
    # a container holding tensors keeps the target's structure
    target = {"mixed": [torch.full((2,), 7.0)]}
    result = zarrckpt.load(target, path)
    assert len(target["mixed"]) == 1 and torch.equal(target["mixed"][0], torch.zeros(2))
    assert "mixed.1" in result.unexpected_keys
    # missing plain containers are missing keys (named by their key)
    with pytest.raises(MissingKeysError) as info:
        zarrckpt.load({"history": [], "w": torch.zeros(3)}, path)
    assert info.value.missing == ["history"]


def test_plain_lists_match_dcp_load(tmp_path: Any) -> None:
    """dcp.load through ZarrStorageReader returns the stored list; so does zarrckpt.load."""
    import torch.distributed.checkpoint as dcp

    path = str(tmp_path / "ckpt")
    zarrckpt.save({"losses": [0.5, 0.4, 0.3], "w": torch.ones(2)}, path)
    via_dcp = {"losses": [9.0], "w": torch.zeros(2)}
    dcp.load(via_dcp, storage_reader=zarrckpt.ZarrStorageReader(path))
    direct = {"losses": [9.0], "w": torch.zeros(2)}
    zarrckpt.load(direct, path)
    assert direct["losses"] == via_dcp["losses"] == [0.5, 0.4, 0.3]


# --------------------------------------------------------------------------- item 4: optimizer


class _Bert(nn.Module):
    """An encoder, a pooler that never gets gradients, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.pooler = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def _trained(seed: int, steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = _Bert()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(steps):
        model(torch.randn(3, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index, entry in sa["state"].items():
        assert entry.keys() == sb["state"][index].keys()
        for name, value in entry.items():
            other = sb["state"][index][name]
            assert value.dtype == other.dtype and value.device == other.device
            assert torch.equal(value, other), (index, name)


@pytest.fixture()
def partial_optimizer(tmp_path: Any) -> tuple[str, nn.Module, torch.optim.Optimizer]:
    """A checkpoint whose optimizer state covers encoder and head but not the pooler."""
    model, optimizer = _trained(seed=0, steps=2)
    assert len(optimizer.state) == 4  # the pooler's two parameters have no state
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"model": model, "optim": optimizer, "extra": {"losses": [0.5]}}, path)
    return path, model, optimizer


def test_fresh_stateful_optimizer_loads_partial_state(partial_optimizer: Any) -> None:
    path, model, optimizer = partial_optimizer
    model2, optimizer2 = _trained(seed=1, steps=0)
    result = zarrckpt.load({"model": model2, "optim": optimizer2}, path)
    assert result == zarrckpt.LoadResult([], ["extra.losses.0"])
    _assert_same_optimizer_state(optimizer, optimizer2)
    # the next step is the source's next step, bit for bit
    for m, o in ((model, optimizer), (model2, optimizer2)):
        torch.manual_seed(7)
        m(torch.randn(3, 4)).sum().backward()
        o.step()
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2), name


def test_optimizer_with_state_for_every_parameter_loads_partial_state(
    partial_optimizer: Any,
) -> None:
    """An optimizer whose state covers the pooler too (here: trained with it) ends up
    without pooler state, as the source: Optimizer.load_state_dict's semantics."""
    path, _, optimizer = partial_optimizer
    model2, optimizer2 = _trained(seed=1, steps=1)
    optimizer2.state[model2.pooler.weight]["exp_avg"] = torch.ones(4, 4)
    optimizer2.state[model2.pooler.weight]["step"] = torch.tensor(1.0)
    target = {"model": model2.state_dict(), "optim": optimizer2.state_dict()}
    assert len(target["optim"]["state"]) == 5
    zarrckpt.load(target, path)
    optimizer2.load_state_dict(target["optim"])
    _assert_same_optimizer_state(optimizer, optimizer2)


def test_flattened_optimizer_state_dict_loads_partial_state(tmp_path: Any) -> None:
    """get_state_dict / set_state_dict (DCP's FQN-keyed optimizer state dicts)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    model, optimizer = _trained(seed=0, steps=2)
    path = str(tmp_path / "ckpt")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    zarrckpt.save({"model": model_sd, "optim": optim_sd}, path)

    model2, optimizer2 = _trained(seed=1, steps=0)
    model_sd2, optim_sd2 = get_state_dict(model2, optimizer2)  # initializes every state
    assert "pooler.weight" in optim_sd2["state"]
    zarrckpt.load({"model": model_sd2, "optim": optim_sd2}, path)
    assert sorted(optim_sd2["state"]) == sorted(optim_sd["state"])
    set_state_dict(
        model2,
        optimizer2,
        model_state_dict=model_sd2,
        optim_state_dict=optim_sd2,
        options=StateDictOptions(strict=False),  # DCP's own check of missing pooler state
    )
    _assert_same_optimizer_state(optimizer, optimizer2)


def test_param_group_mismatch_is_refused(partial_optimizer: Any) -> None:
    path, model, _ = partial_optimizer
    model2 = _Bert()
    optimizer2 = torch.optim.AdamW(
        [{"params": [model2.encoder.weight]}, {"params": list(model2.head.parameters())}]
    )
    with pytest.raises(ShapeMismatchError, match="param groups of \\[6\\] parameters"):
        zarrckpt.load({"model": model2, "optim": optimizer2}, path)
    assert not optimizer2.state


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> Any:
    return (
        {k: (id(p), p.detach().clone()) for k, p in _tensors(model)},
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(extra),
    )


def _same_snapshot(a: Any, b: Any) -> bool:
    params_a, optim_a, extra_a = a
    params_b, optim_b, extra_b = b
    if params_a.keys() != params_b.keys() or optim_a["param_groups"] != optim_b["param_groups"]:
        return False
    if any(
        ia != ib or not torch.equal(ta, tb)
        for (ia, ta), (ib, tb) in zip(params_a.values(), params_b.values(), strict=True)
    ):
        return False
    if optim_a["state"].keys() != optim_b["state"].keys():
        return False
    for k, entry in optim_a["state"].items():
        if any(not torch.equal(v, optim_b["state"][k][n]) for n, v in entry.items()):
            return False
    return str(extra_a) == str(extra_b)


def test_failing_load_leaves_the_target_untouched(partial_optimizer: Any) -> None:
    """Missing keys, a shape mismatch, a skipped meta tensor: the module's parameters
    and buffers, the optimizer's state (fresh or trained) and plain values are as
    before the load."""
    path, _, _ = partial_optimizer
    for trained in (False, True):
        for failure in ("missing", "shape", "meta_missing"):
            model2, optimizer2 = _trained(seed=1, steps=1 if trained else 0)
            extra: dict[str, Any] = {"losses": [1.0]}
            target: dict[str, Any] = {"model": model2, "optim": optimizer2, "extra": extra}
            strict = True
            if failure == "missing":
                target["absent"] = torch.zeros(2)
            elif failure == "shape":
                target["model"] = nn.ModuleDict(
                    {"encoder": model2.encoder, "pooler": model2.pooler, "head": nn.Linear(5, 2)}
                )
            else:
                target["absent"] = torch.empty(2, device="meta")
                strict = False
            before = _snapshot(model2, optimizer2, extra)
            with pytest.raises(StateDictMismatchError):
                zarrckpt.load(target, path, strict=strict)
            after = _snapshot(model2, optimizer2, extra)
            assert _same_snapshot(before, after), (failure, trained)


def test_corrupt_chunk_leaves_optimizer_and_plain_values_untouched(
    partial_optimizer: Any,
) -> None:
    """A chunk that fails its checksum while reading: the fresh optimizer gets no state
    and plain values keep theirs (tensors read straight into the target may be
    partly filled, see the load docstring)."""
    path, _, _ = partial_optimizer
    chunk = os.path.join(path, "optim.state.0.exp_avg", "c.0.0")
    with open(chunk, "r+b") as f:
        f.seek(3)
        byte = f.read(1)
        f.seek(3)
        f.write(bytes([byte[0] ^ 0xFF]))
    model2, optimizer2 = _trained(seed=1, steps=0)
    extra = {"losses": [1.0]}
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        zarrckpt.load({"model": model2, "optim": optimizer2, "extra": extra}, path)
    assert not optimizer2.state and extra == {"losses": [1.0]}


# --------------------------------------------------------------------------- item 7: result


def test_load_returns_missing_and_unexpected_keys(tmp_path: Any) -> None:
    path = str(tmp_path / "ckpt")
    zarrckpt.save({"w": torch.arange(6.0), "b": torch.ones(2), "opt": {"step": 3}}, path)
    target = {"w": torch.zeros(6), "extra": torch.zeros(3), "note": "x"}
    result = zarrckpt.load(target, path, strict=False)
    assert isinstance(result, zarrckpt.LoadResult)
    assert result.missing_keys == ["extra", "note"]
    assert result.unexpected_keys == ["b", "opt.step"]
    assert torch.equal(target["w"], torch.arange(6.0)) and target["note"] == "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.missing_keys = []  # type: ignore[misc]
    assert zarrckpt.load({"w": torch.zeros(6), "b": torch.zeros(2), "opt": {"step": 0}}, path) == (
        zarrckpt.LoadResult(missing_keys=[], unexpected_keys=[])
    )
    assert "LoadResult" in zarrckpt.__all__


def test_root_that_cannot_be_filled_in_place_is_refused(tmp_path: Any) -> None:
    """The result is no longer the state dict: a root tuple cannot receive values."""
    path = str(tmp_path / "ckpt")
    zarrckpt.save((1, 2), path)
    with pytest.raises(UnsupportedValueError, match="in place"):
        zarrckpt.load((0, 0), path)


# --------------------------------------------------------------------------- distributed


def test_fsdp2_meta_model_is_materialized(tmp_path: Any) -> None:
    """FSDP2 on a meta model: a checkpoint directory, a safetensors file and a
    torch.save file all load into DTensor parameters with their mesh and placements."""
    results = run_distributed(cases.fsdp2_meta_load, 2, str(tmp_path))
    assert [r["failures"] for r in results] == [[], []]


def test_fsdp2_fresh_optimizer_loads_partial_state(tmp_path: Any) -> None:
    """FSDP2 + a fresh AdamW whose checkpoint has no state for an unused pooler."""
    results = run_distributed(cases.fsdp2_partial_optimizer_load, 2, str(tmp_path))
    assert [r["failures"] for r in results] == [[], []]
