"""`transformers.Trainer` as-is with a KronModel: default TrainingArguments, adapter-sized checkpoints,
`save_model()`, `resume_from_checkpoint`, `load_best_model_at_end`, gradient checkpointing, and
accelerate's `save_state`/`load_state`."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from conftest import make_model
from kronpeft import KronAConfig, KronModel, get_model
from kronpeft.integrations.trainer import KronSaveCallback

GLUE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue"


def _accuracy(prediction):
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _adapter_tensors(model: KronModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.adapter_state_dict().items()}


@pytest.fixture(scope="module")
def sst2(minilm_path):
    """64 train and 32 dev SST-2 sentences, tokenised, with the raw `sentence` column left in."""
    from kronpeft.runner.data import limit, load_split

    if not (GLUE / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE data not found in {GLUE}")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)

    def encode(split, n):
        rows = limit(load_split("sst2", split, GLUE), n, 0)
        return [{**tokenizer(r.text_a, truncation=True, max_length=48), "sentence": r.text_a, "labels": r.label}
                for r in rows]
    return tokenizer, encode("train", 64), encode("dev", 32)


def _minilm_kron(minilm_path):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)
    return get_model(base, KronAConfig())


def _trainer(model, out, tokenizer, train, dev, **args):
    args = TrainingArguments(str(out), per_device_train_batch_size=16, per_device_eval_batch_size=32,
                             learning_rate=1e-3, report_to=[], seed=0, **args)
    return Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev, processing_class=tokenizer,
                   compute_metrics=_accuracy, callbacks=[KronSaveCallback()])


def test_trainer_on_real_minilm_and_glue(minilm_path, sst2, tmp_path):
    tokenizer, train, dev = sst2
    model = _minilm_kron(minilm_path)
    trainer = _trainer(model, tmp_path / "run", tokenizer, train, dev, max_steps=8, eval_strategy="steps",
                       eval_steps=4, save_steps=4)
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_accuracy"} <= set(metrics)  # labels found, compute_metrics run
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and metrics["eval_loss"] > 0
    for checkpoint in ("checkpoint-4", "checkpoint-8"):
        folder = tmp_path / "run" / checkpoint
        assert _folder_mb(folder) < 5, f"{checkpoint}: {_folder_mb(folder):.1f} MB"
        assert (folder / "adapter_config.json").is_file()
    uninterrupted = _adapter_tensors(model)

    trainer.save_model()
    reloaded = KronModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2),
                                         tmp_path / "run")
    batch = tokenizer(["a gripping, funny film", "dull and far too long"], padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, model(**batch).logits)

    # a fresh process would start from checkpoint-4: same final adapter as the run that went on
    resumed = _minilm_kron(minilm_path)
    _trainer(resumed, tmp_path / "run", tokenizer, train, dev, max_steps=8, eval_strategy="steps", eval_steps=4,
             save_steps=4).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    after_resume = _adapter_tensors(resumed)
    assert after_resume.keys() == uninterrupted.keys()
    assert all(torch.equal(after_resume[k], uninterrupted[k]) for k in uninterrupted)


class _Tiny(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids, self.labels = torch.randint(3, 100, (n, 8), generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i], "note": "dropped by the Trainer"}


def test_load_best_model_at_end_and_gradient_checkpointing(tmp_path):
    model = get_model(make_model("bert"), KronAConfig())
    trainer = Trainer(model=model, train_dataset=_Tiny(32, 0), eval_dataset=_Tiny(16, 1), compute_metrics=_accuracy,
                      callbacks=[KronSaveCallback()],
                      args=TrainingArguments(str(tmp_path), max_steps=6, eval_strategy="steps", eval_steps=2,
                                             save_steps=2, per_device_train_batch_size=4, learning_rate=5e-2,
                                             load_best_model_at_end=True, metric_for_best_model="eval_loss",
                                             gradient_checkpointing=True, report_to=[], seed=0))
    trainer.train()
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith(".B"))  # grads flowed
    best = Path(trainer.state.best_model_checkpoint)
    losses = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert best.name == f"checkpoint-{min(losses, key=losses.get)}"
    best_model = KronModel.from_pretrained(make_model("bert"), best)
    assert all(torch.equal(v, model.adapter_state_dict()[k]) for k, v in best_model.adapter_state_dict().items())
    # the end-of-training adapter in output_dir is the best one too
    final = KronModel.from_pretrained(make_model("bert"), tmp_path)
    assert all(torch.equal(v, model.adapter_state_dict()[k]) for k, v in final.adapter_state_dict().items())


def test_state_dict_holds_the_trained_tensors_and_loads_strictly():
    model = get_model(make_model("bert"), KronAConfig())
    state = model.state_dict()
    assert state and all(".kronpeft.default." in k or k.startswith("base_model.classifier.") for k in state)
    other = get_model(make_model("bert", seed=1), KronAConfig())
    assert not other.load_state_dict(state, strict=True).missing_keys
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())


def test_accelerate_save_state_load_state(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = get_model(make_model("bert"), KronAConfig())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    for seed in range(2):
        batch = _Tiny(4, seed)
        model(input_ids=batch.ids, labels=batch.labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(str(tmp_path / "state"))
    assert _folder_mb(tmp_path / "state") < 1  # the frozen base is not in it
    saved = _adapter_tensors(model)

    other = get_model(make_model("bert", seed=1), KronAConfig())
    other_optimizer = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-2)
    fresh = Accelerator(cpu=True)  # as a new process would
    other, other_optimizer = fresh.prepare(other, other_optimizer)
    fresh.load_state(str(tmp_path / "state"))
    assert all(torch.equal(v, saved[k]) for k, v in other.adapter_state_dict().items())
