"""Value ranges: every number that would corrupt, crash or hang a run is refused by validation.

Each bad value gives one line naming the dotted key, the value and the allowed range, from
``load_config`` (so ``hcp check`` and ``hcp run`` say the same) and, for a few, from the CLI:
exit status 2, no traceback. Nothing here trains: validation happens before anything loads.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Dict, List

import attrs
import pytest

from hcp_core.config import build_pipeline
from hcp_core.config.loader import apply_override
from hcp_core.config.validators import at_least, describe_range, each, greater_than, in_range, not_blank, one_of
from hcp_core.errors import ConfigError
from hcp_core.plugins import get_registry
from train_support import hcp

HEAD = "invalid config:\n  "

#: A pipeline on the built-in components (nothing is read: validation only).
RAW: Dict[str, Any] = {
    "model": {"pretrained": "models/sd15"},
    "data": {"ds": {"sources": [{"type": "image_folder", "img_root": "imgs"}], "bucket": {"type": "ratio"}}},
}


def problems(*overrides: str) -> List[str]:
    """The lines of the ConfigError validating RAW with ``overrides`` raises."""
    raw = copy.deepcopy(RAW)
    for item in overrides:
        apply_override(raw, item)
    with pytest.raises(ConfigError) as err:
        build_pipeline(raw, get_registry())
    text = str(err.value)
    return text[len(HEAD):].split("\n  ") if text.startswith(HEAD) else [text]


def accepted(*overrides: str):
    raw = copy.deepcopy(RAW)
    for item in overrides:
        apply_override(raw, item)
    return build_pipeline(raw, get_registry())


LORA = "lora_unet=[{ layers = ['a'] }]"

BAD = [
    # seeds: numpy's range
    ("seed=-1", "seed: must be between 0 and 4294967295, got -1"),
    ("seed=8589934592", "seed: must be between 0 and 4294967295, got 8589934592"),
    ("sample={ prompts = ['x'], seed = -1 }", "sample.seed: must be between 0 and 4294967295, got -1"),
    # paths
    ("exp_dir=''", "exp_dir: must not be empty or blank, got ''"),
    ("exp_dir='   '", "exp_dir: must not be empty or blank, got '   '"),
    ("model.pretrained=''", "model.pretrained: must not be empty or blank, got ''"),
    ("data.ds.cache_dir=' '", "data.ds.cache_dir: must not be empty or blank, got ' '"),
    # train
    ("train.max_grad_norm=nan", "train.max_grad_norm: must be a finite number (at least 0), got nan"),
    ("train.max_grad_norm=inf", "train.max_grad_norm: must be a finite number (at least 0), got inf"),
    ("train.max_grad_norm=-1", "train.max_grad_norm: must be at least 0, got -1.0"),
    ("train.noise_offset=nan", "train.noise_offset: must be a finite number (between 0 and 1), got nan"),
    ("train.noise_offset=-0.1", "train.noise_offset: must be between 0 and 1, got -0.1"),
    ("train.min_snr_gamma=inf", "train.min_snr_gamma: must be a finite number (greater than 0), got inf"),
    ("train.min_snr_gamma=0", "train.min_snr_gamma: must be greater than 0, got 0.0"),
    ("train.max_steps=0", "train.max_steps: must be between 1 and 100000000, got 0"),
    ("train.max_steps=9223372036854775807", "train.max_steps: must be between 1 and 100000000, got 9223372036854775807"),
    ("train.gradient_accumulation=100000", "train.gradient_accumulation: must be between 1 and 4096, got 100000"),
    ("train.ema.decay=5.0", "train.ema.decay: must be in [0, 1), got 5.0"),
    ("train.ema.decay=1", "train.ema.decay: must be in [0, 1), got 1.0"),
    ("train.ema.decay=nan", "train.ema.decay: must be a finite number (in [0, 1)), got nan"),
    ("train.optimizer.betas=[2, -1]", "train.optimizer.betas: item 0 of [2.0, -1.0] must be in [0, 1), got 2.0"),
    ("train.optimizer.betas=[0.9, nan]", "train.optimizer.betas: item 1 of [0.9, nan] must be a finite number (in [0, 1)), got nan"),
    ("train.optimizer.weight_decay=nan", "train.optimizer.weight_decay: must be a finite number (at least 0), got nan"),
    ("train.optimizer.weight_decay=-0.01", "train.optimizer.weight_decay: must be at least 0, got -0.01"),
    ("train.optimizer.eps=0", "train.optimizer.eps: must be in (0, 1], got 0.0"),
    ("train.optimizer.eps=inf", "train.optimizer.eps: must be a finite number (in (0, 1]), got inf"),
    ("train.optimizer={ type = 'sgd', momentum = 1 }", "train.optimizer.momentum: must be in [0, 1), got 1.0"),
    ("train.scheduler.min_lr_ratio=nan", "train.scheduler.min_lr_ratio: must be a finite number (between 0 and 1), got nan"),
    ("train.scheduler.min_lr_ratio=1.5", "train.scheduler.min_lr_ratio: must be between 0 and 1, got 1.5"),
    ("train.scheduler.warmup_steps=-1", "train.scheduler.warmup_steps: must be at least 0, got -1"),
    # data
    ("data.ds.loss_weight=nan", "data.ds.loss_weight: must be a finite number (at least 0), got nan"),
    ("data.ds.loss_weight=inf", "data.ds.loss_weight: must be a finite number (at least 0), got inf"),
    ("data.ds.loss_weight=-1", "data.ds.loss_weight: must be at least 0, got -1.0"),
    ("data.ds.batch_size=9223372036854775807", "data.ds.batch_size: must be between 1 and 4096, got 9223372036854775807"),
    ("data.ds.num_workers=100000", "data.ds.num_workers: must be between 0 and 1024, got 100000"),
    ("data.ds.num_workers=-1", "data.ds.num_workers: must be between 0 and 1024, got -1"),
    ("data.ds.num_workers='four'", 'data.ds.num_workers: must be a number of workers (0 to 1024) or "auto", got \'four\''),
    ("data.ds.num_workers=true", "data.ds.num_workers: expected an integer or a string, got True (bool)"),
    ("data.ds.sources.0.repeat=100001", "data.ds.sources[0].repeat: must be between 1 and 10000, got 100001"),
    ("data.ds.sources.0.max_image_pixels=0", "data.ds.sources[0].max_image_pixels: must be between 1 and 2147483648, got 0"),
    ("data.ds.sources.0.text_transforms=[{ type = 'tag_dropout', p = nan }]",
     "data.ds.sources[0].text_transforms[0].p: must be a finite number (between 0 and 1), got nan"),
    ("data.ds.sources.0.text_transforms=[{ type = 'tag_shuffle', keep_first = -1 }]",
     "data.ds.sources[0].text_transforms[0].keep_first: must be at least 0, got -1"),
    ("data.ds.bucket.max_ratio=inf", "data.ds.bucket.max_ratio: must be a finite number (between 1 and 20), got inf"),
    ("data.ds.bucket.max_ratio=nan", "data.ds.bucket.max_ratio: must be a finite number (between 1 and 20), got nan"),
    ("data.ds.bucket.target_area=4611686018427387904", "data.ds.bucket.target_area: must be between 1 and 67108864, got 4611686018427387904"),
    ("data.ds.bucket.num_buckets=200000000", "data.ds.bucket.num_buckets: must be between 1 and 256, got 200000000"),
    # sample
    ("sample={ prompts = ['x'], cfg = nan }", "sample.cfg: must be a finite number (between 0 and 100), got nan"),
    ("sample={ prompts = ['x'], cfg = -1 }", "sample.cfg: must be between 0 and 100, got -1.0"),
    ("sample={ prompts = ['x'], steps = 0 }", "sample.steps: must be between 1 and 1000, got 0"),
    ("sample={ prompts = ['x'], steps = 5000 }", "sample.steps: must be between 1 and 1000, got 5000"),
    ("sample={ prompts = ['x'], size = '16384x512' }", "sample.size: size 16384x512: width and height must be at most 8192"),
    # adapters
    ("lora_unet=[{ layers = ['a'], lr = nan }]", "lora_unet[0].lr: must be a finite number (at least 0), got nan"),
    ("lora_unet=[{ layers = ['a'], lr = inf }]", "lora_unet[0].lr: must be a finite number (at least 0), got inf"),
    ("lora_unet=[{ layers = ['a'], lr = -1e-4 }]", "lora_unet[0].lr: must be at least 0, got -0.0001"),
    ("lora_text_encoder={ layers = ['a'], lr = nan }", "lora_text_encoder.lr: must be a finite number (at least 0), got nan"),
    ("lora_unet=[{ layers = ['a'], rank = 100000 }]", "lora_unet[0].rank: an integer rank must be between 1 and 4096, got 100000"),
    ("lora_unet=[{ layers = ['a'], rank = nan }]",
     "lora_unet[0].rank: a float rank is a fraction of the layer's output channels and must be in (0, 1], got nan"),
    ("lora_unet=[{ layers = ['a'], alpha = inf }]", "lora_unet[0].alpha: must be a finite number (in (0, 65536]), got inf"),
    ("lora_unet=[{ layers = ['a'], alpha = 0 }]", "lora_unet[0].alpha: must be in (0, 65536], got 0.0"),
    ("lora_unet=[{ layers = ['a'], dropout = 1 }]", "lora_unet[0].dropout: must be in [0, 1), got 1.0"),
    ("unet=[{ layers = ['a'], lr = inf }]", "unet[0].lr: must be a finite number (greater than 0), got inf"),
    ("unet=[{ layers = ['a'], lr = nan }]", "unet[0].lr: must be a finite number (greater than 0), got nan"),
    ("tokenizer_pt={ train = [{ name = 'w', lr = nan }] }", "tokenizer_pt.train[0].lr: must be a finite number (greater than 0), got nan"),
    ("tokenizer_pt={ emb_dir = ' ' }", "tokenizer_pt.emb_dir: must not be empty or blank, got ' '"),
]


@pytest.mark.parametrize("override, message", BAD, ids=[o for o, _ in BAD])
def test_a_bad_value_is_one_line_naming_key_value_and_range(override: str, message: str) -> None:
    assert problems(override) == [message]


def test_the_ends_of_every_range_are_accepted() -> None:
    pipe = accepted(
        "seed=4294967295", "data.ds.batch_size=4096", "data.ds.num_workers=1024", "data.ds.loss_weight=0",
        "train.max_steps=100000000", "train.max_grad_norm=0", "train.noise_offset=1", "train.ema.decay=0",
        "train.optimizer.betas=[0, 0.999999]", "train.optimizer.eps=1", "train.scheduler.min_lr_ratio=1",
        "data.ds.bucket={ type = 'ratio', max_ratio = 20, target_area = 67108864, num_buckets = 256, step = 8 }",
        "sample={ prompts = ['x'], seed = 4294967295, steps = 1000, cfg = 100, size = '8192x8192' }",
        "lora_unet=[{ layers = ['a'], rank = 4096, lr = 0 }, { layers = ['b'], rank = 1.0, alpha = 65536 }]",
    )
    assert (pipe.seed, pipe.data["ds"].batch_size, pipe.sample.seed) == (2**32 - 1, 4096, 2**32 - 1)
    assert [g.rank for g in pipe.adapters["lora_unet"]] == [4096, 1.0]


def test_every_bad_value_is_reported_at_once() -> None:
    # attrs stops at a class's first failing validator and runs none when a nested table failed;
    # the converter still checks every scalar, so one run of `hcp check` lists them all.
    lines = problems("seed=-1", "exp_dir=''", "train.ema.decay=5.0", "train.max_steps=0", "data.ds.loss_weight=nan",
                     "data.ds.batch_size=0", LORA, "lora_unet.0.rank=100000", "lora_unet.0.lr=nan")
    assert sorted(line.split(":")[0] for line in lines) == [
        "data.ds.batch_size", "data.ds.loss_weight", "exp_dir", "lora_unet[0].lr", "lora_unet[0].rank", "seed",
        "train.ema.decay", "train.max_steps",
    ]


# --------------------------------------------------------------------------- the shared validators
@attrs.define
class Example:
    n: int = attrs.field(default=1, validator=at_least(1))
    x: float = attrs.field(default=0.5, validator=in_range(0, 1, high_open=True))
    g: float = attrs.field(default=1.0, validator=greater_than(0))
    pair: tuple = attrs.field(default=(0.1, 0.2), validator=each(in_range(0, 1)))
    mode: str = attrs.field(default="a", validator=one_of(("a", "b")))
    name: str = attrs.field(default="x", validator=not_blank)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "must be at least 1, got 0"),
        ({"x": 1.0}, "must be in [0, 1), got 1.0"),
        ({"x": math.nan}, "must be a finite number (in [0, 1)), got nan"),
        ({"g": 0.0}, "must be greater than 0, got 0.0"),
        ({"g": -math.inf}, "must be a finite number (greater than 0), got -inf"),
        ({"pair": (0.5, 1.5)}, "item 1 of [0.5, 1.5] must be between 0 and 1, got 1.5"),
        ({"mode": "c"}, "must be one of 'a', 'b', got 'c'"),
        ({"name": "\t"}, "must not be empty or blank, got '\\t'"),
    ],
)
def test_shared_validators_name_the_field_and_the_range(kwargs: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as err:
        Example(**kwargs)
    assert err.value.args[0] == message
    assert err.value.args[1].name == next(iter(kwargs))


def test_describe_range() -> None:
    assert describe_range(1) == "at least 1"
    assert describe_range(0, low_open=True) == "greater than 0"
    assert describe_range(high=20) == "at most 20"
    assert describe_range(1.0, 20.0) == "between 1 and 20"
    assert describe_range(0, 1, low_open=True) == "in (0, 1]"


def test_schema_imports_nothing_from_data_or_generation() -> None:
    import ast

    import hcp_core.config as config_pkg

    for path in Path(config_pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                target = ("." * node.level) + node.module
                assert not any(part in target.split(".") for part in ("data", "generation", "models", "train", "tools")), (
                    f"{path.name} imports {target}: config is the core's lowest layer"
                )


# --------------------------------------------------------------------------- the CLI
PIPE = """
seed = 1
exp_dir = "{exp}"

[model]
pretrained = "models/none"

[data.ds]
bucket = {{ type = "ratio" }}

[[data.ds.sources]]
type = "image_folder"
img_root = "imgs"
"""


@pytest.mark.parametrize(
    "command, overrides, wants",
    [
        ("check", ["train.ema.decay=5.0", "seed=8589934592"],
         ["train.ema.decay: must be in [0, 1), got 5.0", "seed: must be between 0 and 4294967295, got 8589934592"]),
        ("run", ["data.ds.bucket.max_ratio=inf", "lora_unet=[{ layers = ['a'], lr = nan }]"],
         ["data.ds.bucket.max_ratio: must be a finite number (between 1 and 20), got inf",
          "lora_unet[0].lr: must be a finite number (at least 0), got nan"]),
        ("run", ["exp_dir=''", "data.ds.batch_size=9223372036854775807"],
         ["exp_dir: must not be empty or blank", "data.ds.batch_size: must be between 1 and 4096"]),
    ],
)
def test_cli_refuses_bad_values_without_a_traceback(tmp_path: Path, command: str, overrides: List[str], wants: List[str]) -> None:
    (tmp_path / "pipe.toml").write_text(PIPE.format(exp=tmp_path / "exp"), encoding="utf-8")
    result = hcp(command, str(tmp_path / "pipe.toml"), *overrides, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for want in wants:
        assert want in result.stderr
    assert not (tmp_path / "exp").exists()  # refused before anything was written


def test_cli_refuses_faulty_files_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "binary.toml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    (tmp_path / "deep.toml").write_text("v = " + "[" * 5000 + "]" * 5000, encoding="utf-8")
    (tmp_path / "folder.toml").mkdir()
    for name, want in (("binary.toml", "not a UTF-8 text file"), ("deep.toml", "nested too deeply"),
                       ("folder.toml", "is a folder, not a config file"), ("missing.toml", "config file not found")):
        result = hcp("check", str(tmp_path / name), cwd=tmp_path, timeout=120)
        assert result.returncode == 2, (name, result.stderr)
        assert "Traceback" not in result.stderr and want in result.stderr and name in result.stderr
