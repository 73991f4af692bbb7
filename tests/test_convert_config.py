"""``hcp tools convert-config``: HCP-Diffusion YAMLs (tests/data/hcpdiff, shaped like the original's
cfgs/train examples) become pipelines hcp's own loader accepts, values in the right keys, and every
key that was not converted is named."""
from __future__ import annotations

import io
import tomllib
from pathlib import Path

import pytest

from hcp_core import cli
from hcp_core.config import load_config
from hcp_core.errors import UserError
from hcp_core.tools.convert_config import convert_file
from hcp_core.tools.hcpdiff_yaml import load_hcpdiff_config
from hcp_core.train.preflight import check_pipeline

ROOT = Path(__file__).parent / "data" / "hcpdiff"
EXAMPLES = ROOT / "cfgs" / "train" / "examples"


def convert(name: str, tmp_path: Path):
    """(the conversion, the written TOML path, the TOML read back with tomllib)."""
    conversion = convert_file(EXAMPLES / name)
    path = tmp_path / (Path(name).stem + ".toml")
    path.write_text(conversion.toml(), encoding="utf-8")
    return conversion, path, tomllib.loads(path.read_text(encoding="utf-8"))


def noted(conversion) -> dict:
    return {note.key: note.message for note in conversion.notes}


def demo_overrides(model: Path, data: Path, datasets=("dataset1",)) -> list:
    """What a user sets by hand (the examples name a Hub model and imgs/), in the
    override syntax hcp's messages print (``sources[0]``)."""
    out = [f"model.pretrained={model}"]
    for ds in datasets:
        out += [f"data.{ds}.sources[0].img_root={data}"]
    return out


def test_lora_conventional_converts_to_a_pipeline_that_checks_clean(tmp_path, demo_model_dir, demo_data_dir, monkeypatch):
    conversion, path, toml = convert("lora_conventional.yaml", tmp_path)
    # Values from the file and each of its three bases, merged as the original merged them.
    assert toml["seed"] == 114514 and toml["exp_dir"].startswith("exps/20")  # ${hcp.time:} resolved
    assert toml["model"] == {"pretrained": "runwayml/stable-diffusion-v1-5", "mixed_precision": "auto",
                             "gradient_checkpointing": True}
    train = toml["train"]
    assert (train["max_steps"], train["gradient_accumulation"], train["save_every"], train["max_grad_norm"],
            train["log_every"]) == (1000, 1, 100, 1.0, 20)
    assert train["optimizer"] == {"type": "adamw", "weight_decay": 1e-3}  # YAML's text "1e-3" read as a number
    assert train["scheduler"] == {"type": "constant_with_warmup", "warmup_steps": 50}
    ds = toml["data"]["dataset1"]
    assert (ds["batch_size"], ds["cache_latents"], ds["num_workers"]) == (4, True, 4)
    assert ds["bucket"] == {"type": "ratio", "from": "images", "target_area": 512 * 512, "num_buckets": 5,
                            "step": 8, "max_ratio": 4.0}  # ${times:512,512}; the original's step_size default 8
    assert {k: v for k, v in ds["sources"][0].items() if k != "word_names"} == {
        "type": "image_folder", "img_root": "imgs/", "prompt_template": "prompt_tuning_template/object.txt",
        "text_transforms": [{"type": "tag_shuffle"}, {"type": "tag_dropout", "p": 0.1}]}
    assert toml["lora_unet"] == [{"layers": [r"re:.*\.attn.?$", r"re:.*\.ff$"], "lr": 1e-4, "rank": 8}]
    assert toml["lora_text_encoder"] == [{"layers": ["re:.*self_attn$", "re:.*mlp$"], "lr": 1e-5, "rank": 4}]
    assert "tokenizer_pt" not in toml  # no word trained
    notes = noted(conversion)
    assert set(notes) == {"model.pretrained_model_name_or_path", "train.scale_lr", "data.dataset1.source.data_source1.word_names",
                          "mixed_precision"}
    assert notes["mixed_precision"].startswith("'fp16' became \"auto\"")
    # The template file (prompt_tuning_template/object.txt, found from the repository root) uses {pt1}.
    # The original filled a placeholder no word names with "": so does the conversion, and says so.
    assert "{pt1}, which no word filled" in notes["data.dataset1.source.data_source1.word_names"]
    assert ds["sources"][0]["word_names"] == {"pt1": ""}
    assert "huggingface-cli download runwayml/stable-diffusion-v1-5" in notes["model.pretrained_model_name_or_path"]
    assert path.read_text().startswith("# Converted by `hcp tools convert-config`")
    assert "#   train.scale_lr: True: the original multiplied each lr by the total batch size" in path.read_text()

    # hcp's loader and `hcp check` accept it once the model and image paths are the user's (the demo's),
    # run from the folder the original ran in (prompt_tuning_template/ is relative to it).
    monkeypatch.chdir(ROOT)
    overrides = demo_overrides(demo_model_dir, demo_data_dir)
    pipeline = load_config(path, overrides)
    assert pipeline.adapters["lora_unet"][0].rank == 8 and pipeline.data["dataset1"].bucket.config.step == 8
    out = io.StringIO()
    assert check_pipeline(pipeline, out=out, verify_images=False), out.getvalue()
    assert "model: OK" in out.getvalue()  # the LoRA layer patterns match the model's modules


def test_character_example_resolves_variables_and_names_what_differs(tmp_path):
    conversion, _path, toml = convert("lora_anime_character.yaml", tmp_path)
    source = toml["data"]["dataset1"]["sources"][0]
    # ${dataset_dir} and ${character_name} resolved; the TemplateFill word_names kept as the source's.
    assert (source["img_root"], source["repeat"], source["word_names"]) == ("/root/dataset/surtr_3", 3, {"pt1": "surtr_arknights"})
    assert "caption_file" not in source  # a folder of .txt captions: hcp reads the .txt beside each image
    assert toml["tokenizer_pt"] == {"train": [{"name": "surtr_arknights", "lr": 0.003}], "emb_dir": "embs/", "replace": False}
    assert toml["lora_unet"][0] == {"layers": [r"re:.*\.attn.?$", r"re:.*\.ff$"], "lr": 1e-4, "rank": 8, "dropout": 0.1}
    assert toml["lora_text_encoder"][0]["alpha"] == 2.0 and toml["lora_text_encoder"][0]["rank"] == 4
    assert (toml["model"]["clip_skip"], toml["train"]["log_every"]) == (1, 20)
    assert toml["data"]["dataset1"]["bucket"] == {"type": "ratio", "from": "images", "num_buckets": 1, "step": 8, "max_ratio": 4.0}
    notes = noted(conversion)
    assert "SizeBucket" in notes["data.dataset1.bucket._target_"]
    assert "hcp drops its input" in notes["lora_unet[0].dropout"]
    assert "is a folder of .txt captions" in notes["data.dataset1.source.data_source1.caption_file"]
    assert {"train.optimizer_pt", "train.scale_lr_pt"} <= set(notes)  # a word is trained: its settings matter
    # Variables the file defined for interpolation are not reported as unconverted keys.
    assert not {"character_name", "dataset_dir", "unet_rank", "text_encoder_rank"} & set(notes)


def test_dreambooth_example_two_datasets_finetune_and_unknown_keys(tmp_path, demo_model_dir, demo_data_dir):
    conversion, path, toml = convert("DreamBooth.yaml", tmp_path)
    assert toml["unet"] == [{"layers": [""], "lr": 1e-6}] and "lora_unet" not in toml
    assert toml["train"]["optimizer"] == {"type": "lion", "weight_decay": 0.01}
    assert toml["train"]["ema"] == {"enabled": True, "decay": 0.9995}
    assert toml["train"]["gradient_accumulation"] == 2
    db, prior = toml["data"]["dataset1"], toml["data"]["dataset_class"]
    assert db["bucket"]["target_area"] == 512 * 512  # {_target_: builtins.eval, _args_: ['512*512']}
    assert db["sources"][0]["word_names"] == {"pt1": "sks", "class": "dog"}
    assert (prior["batch_size"], prior["loss_weight"], prior["background"]) == (1, 0.8, "#000000")
    assert prior["bucket"] == {"type": "fixed", "target_size": [512, 512]}
    notes = noted(conversion)
    assert notes["train.optimizer.use_triton"] == "True: the lion optimizer of hcp has no such option"
    assert "hcp schedules over the run's length" in notes["train.scheduler.num_training_steps"]
    # The original file points at a key its own bases do not have: reported, not guessed.
    assert "the config has no 'data.dataset1.source.data_source1.image_transforms'" in \
        notes["data.dataset_class.source.data_source1.image_transforms"]
    pipeline = load_config(path, demo_overrides(demo_model_dir, demo_data_dir, ("dataset1", "dataset_class")))
    assert pipeline.data["dataset_class"].loss_weight == 0.8 and pipeline.train.optimizer.name == "lion"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_base_chain_merges_as_the_original_and_resolves_interpolations(tmp_path, monkeypatch):
    monkeypatch.setenv("HCP_TEST_ROOT", "/data/x")
    write(tmp_path / "repo/cfgs/a.yaml", "seed: 1\ntrain: {save_step: 10, train_steps: 5}\nlist: [1, 2]\nshared: a\n")
    write(tmp_path / "repo/cfgs/b.yaml", "seed: 2\ntrain: {save_step: 20, max_grad_norm: 3}\nshared: b\nonly_b: 1\n")
    child = write(tmp_path / "repo/cfgs/sub/child.yaml", """
_base_: [cfgs/a.yaml, cfgs/b.yaml]
train: {train_steps: 7}
list: [3]
w: 64
area: ${times:${w},${w}}
expr: ${hcp.eval:"(2+2)*8"}
where: ${oc.env:HCP_TEST_ROOT}/imgs
table:
  x:
    y: ${..w}
    z: ${.y}
  w: 5
copy: ${table.x}
bad: ${nowhere.at.all}
code: ${hcp.eval:"__import__('os')"}
""")
    cfg, resolver, files = load_hcpdiff_config(child)
    assert files == [child.resolve(), (tmp_path / "repo/cfgs/a.yaml").resolve(), (tmp_path / "repo/cfgs/b.yaml").resolve()]
    # HCP-Diffusion: cfg = merge(base, cfg) for each base in order, so the file wins, then the first base.
    assert (cfg["seed"], cfg["shared"], cfg["only_b"], cfg["list"]) == (1, "a", 1, [3])
    assert cfg["train"] == {"save_step": 10, "train_steps": 7, "max_grad_norm": 3}
    assert (cfg["area"], cfg["expr"], cfg["where"]) == (4096, 32, "/data/x/imgs")
    assert cfg["table"] == {"x": {"y": 5, "z": 5}, "w": 5}  # ${..w}: one level above x; ${.y}: x's own y
    assert cfg["copy"] == {"y": 5, "z": 5}
    assert cfg["bad"] == "${nowhere.at.all}" and "the config has no 'nowhere.at.all'" in resolver.problems["bad"]
    assert cfg["code"].startswith("${") and "only arithmetic" in resolver.problems["code"]  # never run as code


def test_bases_are_found_from_root_and_missing_ones_are_named(tmp_path):
    write(tmp_path / "elsewhere/base.yaml", "seed: 3\n")
    child = write(tmp_path / "cfg/child.yaml", "_base_: base.yaml\nexp_dir: out\n")
    with pytest.raises(UserError, match="_base_ file 'base.yaml' not found .* give it with --root DIR"):
        load_hcpdiff_config(child)
    cfg, _, _ = load_hcpdiff_config(child, root=tmp_path / "elsewhere")
    assert cfg == {"seed": 3, "exp_dir": "out"}
    loop = write(tmp_path / "loop/a.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(UserError, match="inherit from each other in a loop"):
        load_hcpdiff_config(loop)


def test_sdxl_text_encoder_groups_cover_both_encoders_and_unknown_components_are_named(tmp_path):
    old = write(tmp_path / "sdxl.yaml", """
model: {pretrained_model_name_or_path: /models/sdxl, clip_skip: 1}
mixed_precision: bf16
lora_text_encoder: [{lr: 1e-5, rank: 0.25, alpha: 3, alpha_auto_scale: False, layers: ['cls(CLIPAttention):re:.*']}]
lora_unet: [{lr: 1e-4, rank: 4, alpha: 2, alpha_auto_scale: False, bias: True, layers: ['re:.*attn2$']}]
train:
  train_steps: 500
  train_epochs: 3
  optimizer: {_target_: my.pkg.FancyOpt, lr: 1}
  loss: {criterion: {_target_: hcpdiff.loss.MinSNRLoss, gamma: 5.0}}
data:
  ds:
    _target_: hcpdiff.data.CropInfoPairDataset
    batch_size: 2
    source: {s: {img_root: /imgs, image_transforms: {transforms: [{_target_: torchvision.transforms.RandomHorizontalFlip}]}}}
    bucket: {_target_: hcpdiff.data.bucket.RatioBucket.from_ratios, target_area: 1048576, num_bucket: 8, ratio_max: 3}
mystery: 42
""")
    conversion = convert_file(old)
    toml = tomllib.loads(conversion.toml())
    assert toml["lora_text_encoder_2"] == toml["lora_text_encoder"]  # the original's covered both CLIPs
    assert toml["lora_unet"][0]["alpha"] == 8.0  # alpha_auto_scale false: scale alpha -> hcp's alpha / rank
    assert toml["train"]["min_snr_gamma"] == 5.0 and "optimizer" not in toml["train"]
    # The original counted epochs on the first dataset and ignored train_steps beside train_epochs.
    assert (toml["train"]["epochs"], toml["train"]["epoch_dataset"], "max_steps" in toml["train"]) == (3, "ds", False)
    assert toml["data"]["ds"]["bucket"] == {"type": "ratio", "from": "ratios", "target_area": 1048576, "num_buckets": 8,
                                            "step": 8, "max_ratio": 3.0}
    notes = noted(conversion)
    assert "not an optimizer hcp knows" in notes["train.optimizer._target_"]
    assert "'cls(...)' and 'pre_hook' prefixes are not hcp syntax" in notes["lora_text_encoder[0].layers"]
    assert "hcp always scales by alpha / rank" in notes["lora_text_encoder[0].alpha_auto_scale"]
    assert "groups have no such option" in notes["lora_unet[0].bias"]
    assert "RandomHorizontalFlip" in notes["data.ds.source.s.image_transforms"]
    assert notes["mystery"] == "42: no hcp equivalent"
    assert "500 dropped: train_epochs = 3 sets the length" in notes["train.train_steps"]
    assert "[[lora_text_encoder_2]]" in notes["lora_text_encoder"]


def test_the_command_writes_the_file_and_lists_the_notes(tmp_path, capsys):
    out = tmp_path / "new.toml"
    argv = ["tools", "convert-config", str(EXAMPLES / "lora_conventional.yaml"), "-o", str(out)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert f"wrote {out}" in err and "4 key(s) not converted" in err and "  train.scale_lr: True" in err
    assert tomllib.loads(out.read_text())["lora_unet"][0]["rank"] == 8
    assert cli.main(argv) == 2  # never overwrites silently
    assert "exists; add --force" in capsys.readouterr().err
    assert cli.main(["tools", "convert-config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("value, model_key, note", [("True", True, None), ("False", None, None),
                                                    ("fast", None, "model.allow_tf32 takes true or false")])
def test_allow_tf32_is_carried_over(tmp_path, value, model_key, note):
    """HCP-Diffusion's top-level allow_tf32: true becomes model.allow_tf32 = true, false is hcp's
    default (nothing written, nothing noted), anything else is named."""
    cfg = write(tmp_path / "tf32.yaml", f"allow_tf32: {value}\nmodel: {{pretrained_model_name_or_path: /m}}\n")
    conversion = convert_file(cfg)
    toml = tomllib.loads(conversion.toml())
    assert toml["model"].get("allow_tf32") == model_key
    assert noted(conversion).get("allow_tf32") == (None if note is None else f"'fast': hcp's {note}")
