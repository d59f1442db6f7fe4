"""`sweep promote`: merge, check, save, register; the GPTQ path up to the quantization call."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from peft import PeftModel
from peft.tuners.lora import LoraModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from core.config import load_config
from core.rows import load_splits
from core.store import Store
from runners.data import tokenize_example
from runners.models import ModelCache
from sweeps.cli import app
from sweeps.promote import GptqSettings, calibration_samples, gptq_recipe, promote
from sweeps.study import load_study, open_study
from tests.conftest import config_text, copy_mlflow_db

pytestmark = pytest.mark.slow  # every test promotes trials of a real sweep (or exports GPTQ)

# A grid over the method gives one LoRA and one full trial (the fixture checks); a high fixed learning rate
# makes the adapter move the logits well past the fp32 merge tolerance, so the check has teeth.
SPACE = "method: {type: categorical, choices: [lora, full]}"
TRAINING = "learning_rate: 5.0e-3\nlora_rank: 4\nmax_steps: 4\nper_device_batch_size: 8\ncutoff_len: 48"


def sweep(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_model, sort_data, empty_mlflow_db) -> Path:
    """A project folder holding a finished two-trial sweep 'tiny' (one LoRA, one full trial)."""
    root = tmp_path_factory.mktemp("swept")
    copy_mlflow_db(empty_mlflow_db, root)
    text = config_text(tiny_model, *sort_data, "tiny", SPACE, TRAINING, "")
    (root / "tiny.yaml").write_text(text.replace("  type: random\n", "  type: grid\n"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = sweep("run", "tiny.yaml", "--trials", 2)
        assert result.exit_code == 0, result.output
        assert sorted(t.params["method"] for t in study().trials) == ["full", "lora"]
    return root


@pytest.fixture
def project(swept, tmp_path, monkeypatch) -> Path:
    """A private copy of the swept project as the working directory: promotions write into it."""
    root = tmp_path / "project"
    shutil.copytree(swept, root)
    monkeypatch.chdir(root)
    return root


def study() -> optuna.Study:
    return load_study(load_config("tiny.yaml"), Store.at())


def trial_of(method: str) -> optuna.trial.FrozenTrial:
    return next(t for t in study().trials if t.params["method"] == method)


def tracking_uri() -> str:
    return f"sqlite:///{Path('mlruns/mlflow.db').resolve()}"


def registry() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri(), registry_uri=tracking_uri())


def digest(folder: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()


def artifact_dir(trial: optuna.trial.FrozenTrial) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=trial.user_attrs["adapter_uri"]))


def test_promoting_the_best_trial_registers_a_champion_version_with_its_provenance(project):
    result = sweep("promote", "tiny.yaml")
    assert result.exit_code == 0, result.output
    best = study().best_trial
    folder = project / "mlruns" / "promoted" / "tiny" / f"trial-{best.number}"
    assert (folder / "model.safetensors").is_file()
    version = registry().get_model_version_by_alias("tiny", "champion")
    assert str(version.version) == "1"
    assert version.tags["merged.source"] == folder.resolve().as_uri()
    assert version.run_id == best.user_attrs["mlflow_run_id"]
    logged = registry().get_logged_model(version.tags["logged_model.id"])
    assert version.source == logged.artifact_location
    assert (logged.name, logged.source_run_id, logged.status) == (
        "merged",
        version.run_id,
        LoggedModelStatus.READY,
    )
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "tiny", "version": "1"}]
    tags = version.tags
    assert tags["sweep.name"] == "tiny" and tags["trial.number"] == str(best.number)
    assert tags["trial.run_id"] == best.user_attrs["mlflow_run_id"]
    assert tags["param.method"] == best.params["method"] and tags["param.learning_rate"] == "0.005"
    assert float(tags["trial.value"]) == best.value


STANDALONE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    folder, out = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    GenerationConfig.from_pretrained(folder)
    messages = [{"role": "user", "content": "Sort the numbers.\\n\\n5 3 9"}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    project = {"sweeps", "runners", "objectives"} & {name.split(".")[0] for name in sys.modules}
    torch.save({"ids": ids, "logits": logits, "project_modules": sorted(project)}, out)
    """
)


def test_the_merged_folder_loads_standalone_and_matches_base_plus_adapter(project, tiny_model):
    lora = trial_of("lora")
    assert sweep("promote", "tiny.yaml", "--trial", lora.number).exit_code == 0
    folder = project / "mlruns" / "promoted" / "tiny" / f"trial-{lora.number}"
    out = project / "standalone.pt"
    # -I keeps the working directory and PYTHONPATH off sys.path; project_modules proves the rest.
    subprocess.run([sys.executable, "-I", "-c", STANDALONE, str(folder), str(out)], check=True, timeout=120)
    standalone = torch.load(out)
    assert standalone["project_modules"] == []
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(input_ids=standalone["ids"]).logits
        adapted = PeftModel.from_pretrained(base, artifact_dir(lora)).eval()
        reference = adapted(input_ids=standalone["ids"]).logits
    scale = reference.abs().max()
    assert (standalone["logits"] - reference).abs().max() <= 1e-4 * scale
    assert (base_logits - reference).abs().max() > 1e-2 * scale


DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo"
ARITHMETIC = f"""\
name: arith
model: {{name_or_path: {DEMO / "model"}, dtype: float32}}
data: {{format: gsm8k, train_file: {DEMO / "train.jsonl"}, eval_file: {DEMO / "eval.jsonl"}}}
objective: {{name: eval_loss}}
space:
  method: {{type: categorical, choices: [lora]}}
training: {{learning_rate: 1.0e-3, lora_rank: 4, max_steps: 2, per_device_batch_size: 8, cutoff_len: 128}}
"""


@pytest.fixture(scope="module")
def arithmetic(tmp_path_factory) -> Path:
    """A project folder holding a one-trial LoRA sweep 'arith' of the demo's pretrained model, which
    answers one-digit word problems (the random-weight tiny model's first token is EOS)."""
    root = tmp_path_factory.mktemp("arith")
    (root / "arith.yaml").write_text(ARITHMETIC)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        result = sweep("run", "arith.yaml", "--trials", 1)
        assert result.exit_code == 0, result.output
    return root


def test_the_registered_champion_loads_in_mlflow_pyfunc_and_answers_as_the_promoted_folder(
    arithmetic, monkeypatch
):
    monkeypatch.chdir(arithmetic)
    result = sweep("promote", "arith.yaml", "--output", "champion")
    assert result.exit_code == 0, result.output
    assert "models:/arith@champion" in result.output  # promote prints the URI it loads from
    # How a user points MLflow at this project's store: `models:/` URIs resolve through it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri())
    prompt = "Question: Ann has 7 pens and gives away 3. How many pens does Ann have now?\nAnswer:"
    champion = mlflow.pyfunc.load_model("models:/arith@champion")
    (answer,) = champion.predict([prompt])
    assert isinstance(answer, str) and answer.startswith("7 - 3 = 4"), answer
    # The reply to the prompt as a user turn of the trials' chat template, greedy: what the promoted
    # folder itself answers with transformers alone.
    folder = arithmetic / "champion"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    generated = model.generate(input_ids=ids, max_new_tokens=16, do_sample=False)[0][ids.shape[1] :]
    assert answer == tokenizer.decode(generated, skip_special_tokens=True)
    # The trial run's logged model is the same model; its weights are safetensors, no remote code.
    run_id = registry().get_model_version_by_alias("arith", "champion").run_id
    by_run = mlflow.pyfunc.load_model(f"runs:/{run_id}/merged")
    assert by_run.predict([prompt], params={"max_new_tokens": 4}) == ["7 - 3"]
    files = Path(mlflow.artifacts.download_artifacts("models:/arith@champion"))
    assert (files / "model" / "model.safetensors").is_file() and not list(files.rglob("*.bin"))
    assert "trust_remote_code" not in (files / "MLmodel").read_text()


def test_a_full_fine_tuning_trial_is_resaved_as_is_without_a_merge(project):
    full = trial_of("full")
    assert sweep("promote", "tiny.yaml", "--trial", full.number).exit_code == 0
    promoted = load_file(
        project / "mlruns" / "promoted" / "tiny" / f"trial-{full.number}" / "model.safetensors"
    )
    trained = load_file(artifact_dir(full) / "model.safetensors")
    assert promoted.keys() == trained.keys()
    assert all(torch.equal(promoted[key], trained[key]) for key in trained)
    tags = registry().get_model_version_by_alias("tiny", "champion").tags
    assert tags["trial.method"] == "full" and "merge.max_rel_logit_error" not in tags


def test_a_second_promotion_makes_version_2_in_a_new_folder_and_keeps_the_first(project):
    assert sweep("promote", "tiny.yaml").exit_code == 0
    first = project / "mlruns" / "promoted" / "tiny" / f"trial-{study().best_trial.number}"
    before = digest(first)
    assert sweep("promote", "tiny.yaml", "--output", "second").exit_code == 0
    champion = registry().get_model_version_by_alias("tiny", "champion")
    assert str(champion.version) == "2"
    assert champion.tags["merged.source"] == (project / "second").resolve().as_uri()
    version_1 = registry().get_model_version("tiny", "1")
    assert champion.tags["logged_model.id"] != version_1.tags["logged_model.id"]
    assert len(registry().search_model_versions("name = 'tiny'")) == 2
    assert digest(first) == before


def test_promoting_into_an_existing_folder_exits_2_and_changes_nothing(project):
    taken = project / "mlruns" / "promoted" / "tiny" / f"trial-{study().best_trial.number}"
    taken.mkdir(parents=True)
    (taken / "model.safetensors").write_bytes(b"an earlier promotion")
    result = sweep("promote", "tiny.yaml")
    assert result.exit_code == 2
    line = one_line_error(result)
    assert f"{taken}: already exists; a promotion never overwrites a folder: pass --output" in line
    assert [p.name for p in taken.parent.iterdir()] == [taken.name]
    assert (taken / "model.safetensors").read_bytes() == b"an earlier promotion"
    assert registry().search_model_versions("name = 'tiny'") == []


def test_a_merge_that_does_not_reproduce_base_plus_adapter_fails_with_the_measured_error(
    project, monkeypatch
):
    # A broken merge, simulated: the adapter is dropped instead of folded into the weights.
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *args, **kwargs: self.unload())
    result = sweep("promote", "tiny.yaml", "--trial", trial_of("lora").number)
    assert result.exit_code == 1
    line = one_line_error(result)
    assert "promotion failed: merged model's logits differ from base+adapter by" in line
    assert "tolerance 0.0001 for float32" in line
    assert list((project / "mlruns" / "promoted" / "tiny").iterdir()) == []
    assert registry().search_model_versions("name = 'tiny'") == []


def test_a_promotion_that_fails_after_logging_its_model_deletes_the_logged_model(project, monkeypatch):
    def disk_full(partial: Path, final: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("sweeps.promote._publish", disk_full)
    with pytest.raises(OSError, match="No space left"):
        promote(load_config("tiny.yaml"), Store.at())
    experiment = registry().get_experiment_by_name("tiny").experiment_id
    assert registry().search_logged_models([experiment]) == []
    assert list((project / "mlruns" / "promoted" / "tiny").iterdir()) == []
    assert registry().search_model_versions("name = 'tiny'") == []


def add_failed_trial() -> int:
    trial = study().ask()
    study().tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return trial.number


def renamed_config(project: Path, name: str) -> str:
    """The sweep's YAML under another sweep name, which has no study yet."""
    config = project / f"{name}.yaml"
    config.write_text((project / "tiny.yaml").read_text().replace("name: tiny", f"name: {name}"))
    return str(config.relative_to(project))


def empty_study(project: Path) -> str:
    """A sweep whose study holds one failed trial and nothing complete."""
    config = renamed_config(project, "empty")
    target = open_study(load_config(config), Store.at())
    target.tell(target.ask(), state=optuna.trial.TrialState.FAIL)
    return config


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            lambda p: [renamed_config(p, "other")],
            "no study named 'other' yet; start it with: sweep run other.yaml",
        ),
        (lambda p: [empty_study(p)], "study 'empty' has no complete trial yet to promote"),
        (lambda p: ["tiny.yaml", "--trial", 99], "--trial: trial 99 does not exist (trials: 0-1)"),
        (
            lambda p: ["tiny.yaml", "--trial", add_failed_trial()],
            "--trial: trial 2 is FAIL; only COMPLETE trials can be promoted",
        ),
        (lambda p: ["tiny.yaml", "--export", "awq"], "--export: unknown export 'awq'; allowed: gptq"),
    ],
    ids=["unknown-sweep", "no-complete-trial", "no-such-trial", "failed-trial", "unknown-export"],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(project, args, message):
    result = sweep("promote", *args(project))
    assert result.exit_code == 2
    assert message in one_line_error(result)
    assert not (project / "mlruns" / "promoted").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_export_gptq_on_cpu_exits_2_before_opening_the_study_or_loading_a_model(project, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("loaded something before the CUDA check")

    monkeypatch.setattr("sweeps.promote.load_study", forbidden)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", forbidden)
    result = sweep("promote", "tiny.yaml", "--export", "gptq")
    assert result.exit_code == 2
    assert "tiny.yaml: export gptq needs a CUDA GPU" in one_line_error(result)


def test_gptq_recipe_is_4_bit_symmetric_groups_of_128_keeping_lm_head_full_precision():
    recipe = gptq_recipe(GptqSettings())
    assert recipe["config_groups"] == {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 4,
                "type": "int",
                "symmetric": True,
                "strategy": "group",
                "group_size": 128,
            },
        }
    }
    assert recipe["ignore"] == ["lm_head"] and recipe["dampening_frac"] == 0.01


def test_gptq_calibration_samples_are_train_rows_rendered_with_the_chat_template(project):
    config = load_config("tiny.yaml")
    splits = load_splits(config.data)
    tokenizer = ModelCache(config.model).tokenizer()
    template = tokenizer.chat_template
    settings = GptqSettings(num_samples=10, max_seq_len=24)
    samples = calibration_samples(splits.train, tokenizer, template, settings)
    assert len(samples) == 10
    assert samples == calibration_samples(splits.train, tokenizer, template, settings)
    train = {tuple(tokenize_example(tokenizer, template, ex)["input_ids"][:24]) for ex in splits.train}
    assert all(tuple(s["input_ids"]) in train for s in samples)
    assert all(len(s["input_ids"]) == 24 and s["attention_mask"] == [1] * 24 for s in samples)
    assert tokenizer.decode(samples[0]["input_ids"]).startswith("<|im_start|>user\nSort the numbers")


class StandInQuantizer:
    """Replaces the GPU-only GPTQ call: records what it was given, writes an unquantized copy."""

    def __init__(self, fail: bool = False):
        self.fail = fail
        self.calls: list[dict] = []

    def __call__(self, model_dir: Path, samples: list, settings: GptqSettings, out_dir: Path) -> None:
        self.calls.append(
            {
                "model_dir": model_dir,
                "model_files": sorted(p.name for p in model_dir.iterdir()),
                "samples": samples,
                "settings": settings,
                "out_dir": out_dir,
            }
        )
        if self.fail:
            raise RuntimeError("quantization failed")
        shutil.copytree(model_dir, out_dir, dirs_exist_ok=True)


@pytest.fixture
def gpu_ready(monkeypatch):
    """Pretend CUDA and llmcompressor are there; the stand-in quantizer replaces the real call."""
    monkeypatch.setattr("sweeps.promote.gptq_unavailable_reason", lambda: None)


def test_gptq_export_wiring_only_a_stand_in_quantizer_gets_the_merged_folder_and_the_delta_is_recorded(
    project, gpu_ready
):
    quantizer = StandInQuantizer()
    settings = GptqSettings(num_samples=8, max_seq_len=32)
    result = promote(load_config("tiny.yaml"), Store.at(), export="gptq", quantize=quantizer, gptq=settings)
    parent = project / "mlruns" / "promoted" / "tiny"
    assert sorted(p.name for p in parent.iterdir()) == [f"trial-{result.trial}", f"trial-{result.trial}-gptq"]
    (call,) = quantizer.calls
    assert call["model_dir"].parent == parent and call["model_dir"].name.startswith(f".trial-{result.trial}.")
    assert call["out_dir"].parent == parent and call["out_dir"].name.startswith(
        f".trial-{result.trial}-gptq."
    )
    assert "model.safetensors" in call["model_files"] and "tokenizer.json" in call["model_files"]
    assert call["settings"] == settings
    config = load_config("tiny.yaml")
    tokenizer = ModelCache(config.model).tokenizer()
    train = load_splits(config.data).train
    assert call["samples"] == calibration_samples(train, tokenizer, tokenizer.chat_template, settings)
    assert (parent / f"trial-{result.trial}-gptq" / "tokenizer.json").is_file()
    assert result.gptq_delta == pytest.approx(0.0, abs=1e-6)
    assert result.gptq_bytes > 0
    tags = registry().get_model_version_by_alias("tiny", "champion").tags
    assert tags["export.gptq.source"] == (parent / f"trial-{result.trial}-gptq").resolve().as_uri()
    assert float(tags["objective.gptq_delta"]) == result.gptq_delta
    assert tags["size.gptq_bytes"] == str(result.gptq_bytes)


def test_gptq_export_wiring_only_a_failing_stand_in_quantizer_leaves_no_folder_and_no_version(
    project, gpu_ready
):
    with pytest.raises(RuntimeError, match="quantization failed"):
        promote(load_config("tiny.yaml"), Store.at(), export="gptq", quantize=StandInQuantizer(fail=True))
    assert list((project / "mlruns" / "promoted" / "tiny").iterdir()) == []
    assert registry().search_model_versions("name = 'tiny'") == []


def test_gptq_export_refuses_an_existing_export_folder_before_loading(project, gpu_ready):
    best = study().best_trial.number
    taken = project / "mlruns" / "promoted" / "tiny" / f"trial-{best}-gptq"
    taken.mkdir(parents=True)
    result = sweep("promote", "tiny.yaml", "--export", "gptq")
    assert result.exit_code == 2
    assert f"trial-{best}-gptq: already exists" in one_line_error(result)
    assert not (project / "mlruns" / "promoted" / "tiny" / f"trial-{best}").exists()
