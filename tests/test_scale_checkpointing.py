"""Gradient checkpointing (reentrant and not) and `torch.compile` give every method's eager gradients
(issue 27): the adapters' hooks, the feed-forward span hook included, run again in the recomputation."""
import pytest
import torch
from conftest import CONFIGS, adapter_names, make_model, randomize_adapters

from kronpeft import get_model

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def adapted(arch: str, method: str):
    model = get_model(no_dropout(make_model(arch)), CONFIGS[method]())
    randomize_adapters(model)  # zero-initialised factors would hide a missing gradient
    return model.train()


def loss_of(model):
    out = model(input_ids=IDS, labels=IDS if model.config.model_type == "llama" else torch.tensor([0, 1]))
    return out.loss


def adapter_grads(model) -> tuple[dict[str, torch.Tensor], int]:
    """The adapters' gradients of one step, and how many times the base's linear layers ran."""
    calls = []
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".kronpeft." not in n]
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in linears]
    model.zero_grad(set_to_none=True)
    loss_of(model).backward()
    for handle in handles:
        handle.remove()
    names = adapter_names(model)
    return {n: p.grad for n, p in model.named_parameters() if n in names}, len(calls)


@pytest.mark.filterwarnings("ignore:`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated")
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "bert"])  # BERT: KronA^B reads the FFN's input through a pre-hook
def test_gradient_checkpointing_gives_the_eager_gradients(arch, method, reentrant):
    model = adapted(arch, method)
    eager, eager_calls = adapter_grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed, calls = adapter_grads(model)
    assert calls > eager_calls  # the layers ran again in the backward recomputation
    assert eager.keys() == checkpointed.keys() and eager
    for name, grad in eager.items():
        assert grad is not None and grad.abs().max() > 0, name
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".kronpeft." not in n)


@pytest.mark.parametrize("method", ["krona", "kronab"])
def test_torch_compile_gives_eager_losses_gradients_and_outputs_without_recompiling(method):
    """`torch.compile` traces the adapters' hooks into one graph per mode (AOTAutograd's joint
    forward/backward; backend `aot_eager` keeps the test short, the inductor timing is in
    benchmarks/scale.py): training steps and inference equal eager, and a step compiles nothing new."""
    from torch._dynamo.utils import counters

    eager, compiled_model = adapted("llama", method), adapted("llama", method)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_model, backend="aot_eager")
    optimizers = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
                  for m in (eager, compiled_model)]
    graphs = []
    for _ in range(2):
        grads = []
        for model, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            loss = loss_of(model)
            loss.backward()
            grads.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
            optimizer.step()
        (loss_eager, grads_eager), (loss_compiled, grads_compiled) = grads
        assert loss_compiled == pytest.approx(loss_eager, rel=1e-5)
        assert grads_eager.keys() == {n.removeprefix("_orig_mod.") for n in grads_compiled} and grads_eager
        for name, grad in grads_compiled.items():
            torch.testing.assert_close(grad, grads_eager[name.removeprefix("_orig_mod.")], rtol=1e-4, atol=1e-6)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[-1] == graphs[0]  # step 2 reused the first step's graph
    eager.eval(), compiled.eval()
    with torch.no_grad():
        for seed in (2, 3):
            ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(seed))
            expected = eager(input_ids=ids).logits
            torch.testing.assert_close(compiled(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs[-1] + 1  # one inference graph for both inputs
