"""Mixed-adapter batches: `model(**batch, adapter_names=[...])` equals running each adapter on its own examples."""
import pytest
import torch

from conftest import CONFIGS, make_model, model_inputs, randomize_adapters
from kronpeft import KronAConfig, get_model
from kronpeft.config import BASE_ADAPTER_NAME
from kronpeft.injection import sites

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = {**CONFIGS, "krona-sum-kpsvd": lambda: KronAConfig(rank=2, init="kpsvd")}


def with_adapters(arch, configs, seed=0):
    """A model with adapters named `a0`, `a1`, ... (random values, own task heads)."""
    torch.manual_seed(seed)
    model = get_model(make_model(arch), configs[0], adapter_name="a0")
    for i, config in enumerate(configs[1:], 1):
        model.add_adapter(f"a{i}", config)
    randomize_adapters(model, seed=seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # each adapter's own head copy differs from the others
            if ".kronpeft.a" in name and "classifier" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


def logits(model, inputs, **kw):
    with torch.no_grad():
        return model(**inputs, **kw).logits


def per_adapter(model, inputs, names):
    """Row i of the output of the whole batch under adapter `names[i]` (the base under BASE_ADAPTER_NAME)."""
    rows = []
    for i, name in enumerate(names):
        if name == BASE_ADAPTER_NAME:
            with model.disable_adapter():
                rows.append(logits(model, inputs)[i])
        else:
            model.set_adapter(name)
            rows.append(logits(model, inputs)[i])
    return torch.stack(rows)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_mixed_batch_equals_each_adapter_on_its_examples(method):
    model = with_adapters("bert", [CONFIGS[method](), CONFIGS[method]()])
    inputs = model_inputs(model, batch=5)
    names = ["a0", BASE_ADAPTER_NAME, "a1", "a0", "a1"]
    got = logits(model, inputs, adapter_names=names)
    want = per_adapter(model, inputs, names)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (want[0] - want[2]).abs().max() > 1e-4  # the adapters differ, so a mix-up would show


def test_different_methods_in_one_batch():
    model = with_adapters("bert", [CONFIGS["krona"](), CONFIGS["kronab-res"](), CONFIGS["adakron"](),
                                   CONFIGS["bottleneck"]()])
    inputs = model_inputs(model, batch=5)
    names = ["a3", "a2", BASE_ADAPTER_NAME, "a1", "a0"]
    torch.testing.assert_close(logits(model, inputs, adapter_names=names), per_adapter(model, inputs, names),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "t5"])
@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_with_a_mixed_batch(arch, num_beams):
    model = with_adapters(arch, [KronAConfig(scale=3.0), KronAConfig(rank=2, scale=3.0)])
    inputs = {"input_ids": model_inputs(model, batch=3)["input_ids"]}
    names = ["a1", BASE_ADAPTER_NAME, "a0"]
    options = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, pad_token_id=0)
    with torch.no_grad():
        got = model.generate(**inputs, adapter_names=names, **options)
        rows = []
        for i, name in enumerate(names):
            if name == BASE_ADAPTER_NAME:
                with model.disable_adapter():
                    rows.append(model.generate(**inputs, **options)[i])
            else:
                model.set_adapter(name)
                rows.append(model.generate(**inputs, **options)[i])
    assert torch.equal(got, torch.stack(rows))


def test_bad_adapter_names_are_refused_clearly():
    model = with_adapters("bert", [KronAConfig(), KronAConfig()])
    inputs = model_inputs(model, batch=3)
    with pytest.raises(ValueError, match=r"adapter_names\[1\] = 'nope' is not an adapter.*\['a0', 'a1'\].*__base__"):
        logits(model, inputs, adapter_names=["a0", "nope", "a1"])
    with pytest.raises(ValueError, match=r"adapter_names has 2 names for a batch of 3 examples"):
        logits(model, inputs, adapter_names=["a0", "a1"])
    with pytest.raises(ValueError, match=r"must be a list of adapter-name strings"):
        logits(model, inputs, adapter_names="a0")
    model.set_adapter("a1")
    model.merge_adapter("a1")
    with pytest.raises(ValueError, match=r"adapter 'a1' is merged.*unmerge_adapter\('a1'\)"):
        logits(model, inputs, adapter_names=["a0", "a1", "a0"])
    assert all(site.mixed_names is None for _, site in sites(model.base_model))


def test_mixed_batch_trains_each_adapter_on_its_rows():
    model = with_adapters("bert", [KronAConfig(), KronAConfig()])
    model.train()
    for p in model.parameters():
        p.requires_grad_(".kronpeft." in "")
    adapters = {n: p for n, p in model.named_parameters() if n.endswith("query.kronpeft.a0.B")
                or n.endswith("query.kronpeft.a1.B")}
    for p in adapters.values():
        p.requires_grad_(True)
    inputs = model_inputs(model, batch=2)
    model(**inputs, adapter_names=["a0", BASE_ADAPTER_NAME]).logits[0].sum().backward()
    grads = {n.split(".kronpeft.")[1]: p.grad for n, p in adapters.items() if "layer.0." in n}
    assert grads["a0.B"].abs().sum() > 0 and (grads["a1.B"] is None or grads["a1.B"].abs().sum() == 0)


@pytest.mark.parametrize("method", ["adakron", "bottleneck", "kronab"])
def test_a_second_adapter_is_sized_by_the_base_modules_not_the_first_adapter(method):
    """Fixed: the width of a block was read from its last linear layer, which was the first adapter's own
    (AdaKron's `v`, width 4) once one was attached, so a second adapter came out with the wrong shapes."""
    model = get_model(make_model("bert"), CONFIGS[method](), adapter_name="a0")
    model.add_adapter("a1", CONFIGS[method]())
    for _, site in sites(model.base_model):
        first, second = site["a0"].state_dict(), site["a1"].state_dict()
        assert {k: v.shape for k, v in first.items()} == {k: v.shape for k, v in second.items()}
