"""CognateModel's forward: the output contract, causality, batch independence, per-token halting, training."""

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from model_testing import VOCAB, random_tokens, small_model

from cognate.model.model import CognateModel

LENGTH = 21  # 5 complete memory chunks of 4 and a partial one


@functools.cache
def _model(mode: str, window: int | None) -> torch.nn.Module:
    model = small_model(attn_window=window)
    return model.train() if mode == "train" else model.eval()


def _forward(model, tokens, **kwargs):
    with torch.no_grad():
        return model(tokens, **kwargs)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_returns_total_loss_its_parts_logits_and_statistics(mode):
    model = _model(mode, None)
    tokens = random_tokens(2, LENGTH)
    targets = torch.roll(tokens, -1, 1)
    targets[:, -1] = -100
    out = _forward(model, tokens, targets=targets)

    # With targets the fused head computes the loss and never materialises the logits.
    assert out.logits is None
    assert _forward(model, tokens).logits.shape == (2, LENGTH, VOCAB)
    assert set(out.losses) == {"ref", "act", "read", "write"}
    assert all(torch.isfinite(value) and value >= 0 for value in out.losses.values())
    assert out.losses["read"] > 0 and out.losses["write"] > 0
    # L_act's target compares with step t_infer, which halted tokens never reach in evaluation.
    assert out.losses["act"] > 0 if mode == "train" else out.losses["act"] == 0
    cfg = model.cfg
    expected = (
        out.losses["ref"]
        + cfg.w_act * out.losses["act"]
        + cfg.w_read * out.losses["read"]
        + cfg.w_write * out.losses["write"]
    )
    torch.testing.assert_close(out.loss, expected)
    n_steps = cfg.t_train if mode == "train" else cfg.t_infer
    assert out.act["steps"].shape == (2, LENGTH)
    assert 1 <= out.act["steps"].min() <= out.act["steps"].max() <= n_steps
    assert 1 <= out.act["mean_steps"] <= n_steps and out.act["var_steps"] > 0
    assert 0 < out.act["mean_halt_prob"] < 1
    assert set(out.memory) == {"write_rate", "read_gate", "slots_used"} and out.memory["slots_used"] > 0
    assert out.memory_state.keys.shape[:3] == (n_steps, 2, cfg.mem_capacity)


def test_without_targets_there_is_no_loss_and_memory_off_returns_no_state():
    model = _model("eval", None)
    out = _forward(model, random_tokens(1, 5))
    assert out.loss is None and out.memory_state is not None  # memory runs at every length
    off = CognateModel(model.cfg.replace(mem_enabled=False)).eval()
    out = _forward(off, random_tokens(1, 5))
    assert out.memory_state is None and out.memory == {}
    assert out.losses["read"] == 0 and out.losses["write"] == 0


def test_the_model_never_shifts_labels():
    """L_ref is the CE of logits[:, i] against targets[:, i] exactly as given (the seeds shifted twice)."""
    model = _model("eval", None)
    tokens = random_tokens(2, LENGTH)
    targets = random_tokens(2, LENGTH, seed=1)
    out = _forward(model, tokens, targets=targets)
    expected = F.cross_entropy(_forward(model, tokens).logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(out.losses["ref"], expected)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("window", [None, 5])
@settings(max_examples=12, deadline=None)
@given(position=st.integers(0, LENGTH - 2), seed=st.integers(0, 2**16))
def test_changing_later_tokens_never_changes_earlier_outputs(mode, window, position, seed):
    """Causality with memory on, in training and in halting inference (the seeds' attention was bidirectional)."""
    model = _model(mode, window)
    tokens = random_tokens(2, LENGTH, seed)
    changed = tokens.clone()
    changed[:, position + 1 :] = random_tokens(2, LENGTH - position - 1, seed + 1)
    out, out_changed = _forward(model, tokens), _forward(model, changed)
    assert out.memory["slots_used"] > 0  # the test is only worth something if memory is read
    keep = slice(0, position + 1)
    torch.testing.assert_close(out.logits[:, keep], out_changed.logits[:, keep], rtol=1e-4, atol=1e-5)
    assert torch.equal(out.act["steps"][:, keep], out_changed.act["steps"][:, keep])


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_sequence_gives_the_same_outputs_alone_or_in_a_batch(mode):
    """Batch independence with memory on (the seeds kept memory in a buffer averaged over the batch)."""
    model = _model(mode, 5)
    batch = random_tokens(3, LENGTH, seed=7)
    together = _forward(model, batch)
    for i in range(3):
        alone = _forward(model, batch[i : i + 1])
        torch.testing.assert_close(alone.logits, together.logits[i : i + 1], rtol=1e-4, atol=1e-5)
        assert torch.equal(alone.act["steps"], together.act["steps"][i : i + 1])
        carried, carried_alone = together.memory_state.select([i]), alone.memory_state
        torch.testing.assert_close(carried_alone.keys, carried.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(carried_alone.strength, carried.strength, rtol=1e-4, atol=1e-5)


def test_no_state_survives_between_calls_except_the_explicit_memory_state():
    model = small_model()
    assert list(model.buffers()) == []
    tokens, other = random_tokens(2, LENGTH), random_tokens(2, LENGTH, seed=3)
    model.eval()
    before = _forward(model, tokens)
    model.train()
    model(other, targets=other).loss.backward()
    model.eval()
    _forward(model, other)
    after = _forward(model, tokens)
    torch.testing.assert_close(before.logits, after.logits, rtol=0, atol=0)

    # Continuing a sequence is only possible through the memory state handed back: it changes the outputs.
    continued = _forward(model, tokens, memory_state=_forward(model, other).memory_state)
    assert not torch.allclose(continued.logits, before.logits)


def test_halting_is_per_token_and_a_halted_token_keeps_its_state():
    """Each token's final logits are its logits at its own halting step; tokens of one sequence differ."""
    model = _model("eval", None)
    tokens = random_tokens(2, LENGTH, seed=11)
    out = _forward(model, tokens)
    steps = out.act["steps"]
    for row in steps:
        assert len(row.unique()) > 1  # tokens of one sequence halt at different steps
    for n in range(1, model.cfg.t_infer + 1):
        stopped_at_n = _forward(model, tokens, n_steps=n)
        here = steps == n
        torch.testing.assert_close(out.logits[here], stopped_at_n.logits[here], rtol=1e-5, atol=1e-6)
        later = steps > n  # still refining after step n: their logits moved on
        if n < model.cfg.t_infer:
            assert later.any() and not torch.allclose(out.logits[later], stopped_at_n.logits[later])


def _rows_through_ffn(model) -> tuple[list[int], list]:
    """A list that fills with the number of tokens each FFN call refines, and the hooks' handles."""
    rows: list[int] = []
    hooks = [
        block.ffn.register_forward_hook(lambda _m, inputs, _out: rows.append(inputs[0].shape[:-1].numel()))
        for block in model.layers
    ]
    return rows, hooks


@pytest.mark.parametrize("memory", [False, True])
def test_a_halted_token_runs_no_block_of_the_later_steps(memory):
    """Halting saves compute: the FFNs refine exactly the tokens still running, sum(steps) per layer in all."""
    model = small_model(mem_enabled=memory).eval()
    tokens = random_tokens(2, LENGTH, seed=11)
    rows, hooks = _rows_through_ffn(model)
    out = _forward(model, tokens, targets=torch.roll(tokens, -1, 1))
    for hook in hooks:
        hook.remove()
    steps = out.act["steps"]
    assert steps.min() < model.cfg.t_infer  # some tokens halted early
    assert sum(rows) == model.cfg.n_layers * int(steps.sum())
    still_running = [int((steps >= t).sum()) for t in range(1, model.cfg.t_infer + 1)]
    assert rows[:: model.cfg.n_layers] == still_running


def test_a_model_without_act_refines_every_token_for_all_steps():
    model = small_model(act_enabled=False).eval()
    out = _forward(model, random_tokens(2, LENGTH), targets=random_tokens(2, LENGTH, seed=1))
    assert (out.act["steps"] == model.cfg.t_infer).all() and out.act["var_steps"] == 0
    assert out.losses["act"] == 0


def _saved_bytes(model, tokens) -> int:
    """Bytes autograd keeps for the backward pass of one training forward."""
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(tokens, targets=tokens)
    return saved


def test_steps_without_gradients_add_no_training_memory():
    """TRM's trick: only steps 1..t_infer and the last grad_steps keep activations, so memory does not grow
    with t_train."""
    tokens = random_tokens(2, LENGTH)
    three, six = (
        small_model(t_train=3, t_infer=1, grad_steps=1),
        small_model(t_train=6, t_infer=1, grad_steps=1),
    )
    assert _saved_bytes(six, tokens) == _saved_bytes(three, tokens)
    assert _saved_bytes(small_model(t_train=6, t_infer=1, grad_steps=2), tokens) > _saved_bytes(six, tokens)
    assert _saved_bytes(small_model(t_train=6, t_infer=2, grad_steps=1), tokens) > _saved_bytes(six, tokens)


def test_every_step_inference_can_stop_at_is_trained():
    """Deep supervision matching inference: each step 1..t_infer gets a gradient from its own CE, also when
    t_infer lies before the last grad_steps steps."""
    model = small_model(t_train=6, t_infer=3, grad_steps=1, act_enabled=False, mem_enabled=False).train()
    tokens = random_tokens(2, LENGTH)
    states = []
    hook = model.layers[-1].register_forward_hook(lambda _m, _i, out: states.append(out))
    out = model(tokens, targets=torch.roll(tokens, -1, 1))
    hook.remove()
    assert [state.requires_grad for state in states] == [True, True, True, False, False, True]
    gradients = torch.autograd.grad(out.loss, [state for state in states if state.requires_grad])
    assert all(gradient.abs().sum() > 0 for gradient in gradients)


def test_every_parameter_gets_a_gradient_from_the_total_loss():
    """No dead parts: the recursion, the halting head and the memory (read and write) all learn."""
    model = small_model(diverse_halting=False)
    tokens = random_tokens(2, 40)
    model(tokens, targets=torch.roll(tokens, -1, 1)).loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    tokens = random_tokens(2, LENGTH)
    plain = small_model(attn_window=5)
    checkpointed = small_model(attn_window=5, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    losses = []
    for model in (plain, checkpointed):
        loss = model(tokens, targets=tokens).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1])
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_on_cpu_agrees_with_the_float32_model():
    # The same model and tokens in float32 and under bf16 autocast: loss, gradient and logits agree to bf16
    # precision (8 mantissa bits, ~0.4%), so bf16 changes rounding, not what is computed (halting, memory, window).
    tokens = random_tokens(2, LENGTH)
    results = []
    for bf16 in (False, True):
        model = small_model(attn_window=5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(tokens, targets=tokens).loss
        loss.backward()
        gradient = {name: p.grad.flatten() for name, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens).logits
        results.append((loss, gradient, logits))
    (loss32, gradient32, logits32), (loss16, gradient16, logits16) = results
    assert logits16.dtype == torch.bfloat16
    assert loss16.item() == pytest.approx(loss32.item(), rel=1e-3)
    assert gradient16.keys() == gradient32.keys()
    for (
        name,
        reference,
    ) in gradient32.items():  # parameter by parameter: a small one's error would hide in a sum
        assert torch.nn.functional.cosine_similarity(gradient16[name], reference, dim=0) > 0.999, name
        assert gradient16[name].norm() == pytest.approx(reference.norm().item(), rel=0.05), name
    assert 0 < (logits16.float() - logits32).abs().max() < 0.01 * logits32.abs().max()  # bf16 is in use


def test_a_few_optimizer_steps_lower_the_loss():
    model = small_model(diverse_halting=False)
    tokens = random_tokens(4, 24, seed=5)
    targets = torch.roll(tokens, -1, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        out = model(tokens, targets=targets)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.losses["ref"].item())
        assert out.losses["act"] >= 0  # bounded: the seeds' ACT term ran to -1815
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.slow
def test_torch_compile_runs_forward_and_backward():
    # aot_eager runs dynamo's graph capture and AOT autograd, which is what a model can break; inductor's C++
    # code generation on top costs minutes on a 2-core CPU and tests the compiler rather than the model.
    tokens = random_tokens(2, LENGTH)
    model = small_model(attn_window=5)
    eager = model(tokens, targets=tokens).loss
    compiled = torch.compile(model, backend="aot_eager")(tokens, targets=tokens).loss
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    assert all(p.grad is not None for p in model.parameters())

    # The core alone compiles to a single graph: no graph breaks in the refinement loop or the attention.
    core_only = small_model(attn_window=5, mem_enabled=False)
    torch.compile(core_only, backend="aot_eager", fullgraph=True)(tokens, targets=tokens).loss.backward()
