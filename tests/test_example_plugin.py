"""The example third-party plugin (examples/plugins/hcp-plugin-example): its components, and the
package installed with pip the way a user would, seen by ``hcp`` through its entry point.

To run a pipeline with the installed plugin (e.g. once training lands), use the
``example_plugin_env`` fixture: the environment for ``python -m hcp_core ...`` subprocesses, with
the plugin and the test plugin (``core_components``) importable and registered.
"""
from __future__ import annotations

import pickle
import random
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Dict

import pytest

import core_components
from core_components import fake_distribution, subprocess_env, write
from hcp_core.config import build_pipeline
from hcp_core.config.loader import apply_override
from hcp_core.errors import ConfigError
from hcp_core.interfaces import BucketContext, CropPlan, PromptParts, SourceContext
from hcp_core.plugins import build_registry

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "hcp-plugin-example"

#: A pipeline using both of the plugin's components (and the test plugin's source).
EXAMPLE_PIPELINE = """\
[model]
pretrained = "models/tiny"

[data.ds1]
bucket = { type = "multiple_of", max_side = 256 }

[[data.ds1.sources]]
type = "test_listing"
listing = "images.txt"
text_transforms = [{ type = "caption_prefix", text = "my-cat" }]
"""


@pytest.fixture(scope="module")
def example():
    """The plugin's modules, imported from the source tree."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(EXAMPLE / "src"))
        from hcp_plugin_example import buckets, plugin, text

        yield SimpleNamespace(plugin=plugin, buckets=buckets, text=text)
    for name in [m for m in sys.modules if m.split(".")[0] == "hcp_plugin_example"]:
        del sys.modules[name]


def make_bucket(example, **config):
    return example.buckets.MultipleOfBucket(example.plugin.MultipleOfConfig(**config), context=BucketContext())


def make_prefix(example, **config):
    return example.text.CaptionPrefix(example.plugin.CaptionPrefixConfig(**config))


# --------------------------------------------------------------------------- bucket
@pytest.mark.parametrize(
    "config, size, target",
    [
        # 1000x600 -> longer side 512: 512x307.2 -> rounded down to 64s: 512x256.
        ({}, (1000, 600), (512, 256)),
        ({}, (600, 1000), (256, 512)),
        ({}, (512, 512), (512, 512)),
        ({}, (100, 100), (512, 512)),  # small images are scaled up
        ({}, (5000, 100), (512, 64)),  # 512x10.24: never below one multiple
        ({"max_side": 768, "multiple": 8}, (1920, 1080), (768, 432)),
        ({"max_side": 768, "multiple": 8}, (1080, 1920), (432, 768)),
        ({"max_side": 256, "multiple": 64}, (3000, 2999), (256, 192)),  # 255.9 rounds down
    ],
)
def test_bucket_target_keeps_the_ratio_and_rounds_down(example, config, size, target) -> None:
    assert make_bucket(example, **config).target(size) == target


def test_bucket_fit_gives_one_sorted_bucket_per_distinct_size(example) -> None:
    bucket = make_bucket(example)
    assert bucket.fit([(1000, 600), (600, 1000), (2000, 1200), (512, 512), (100, 100)]) == [(256, 512), (512, 256), (512, 512)]
    assert bucket.fit([]) == []


def test_bucket_assign(example) -> None:
    bucket = make_bucket(example)
    buckets = bucket.fit([(1000, 600), (600, 1000), (512, 512)])
    assert [bucket.assign(s, buckets) for s in [(600, 1000), (2000, 1200), (64, 64)]] == [0, 1, 2]
    # Unseen: 700x300 wants 512x192 (ratio 2.67); 512x256 (ratio 2) is the closest.
    assert bucket.assign((700, 300), buckets) == 1
    with pytest.raises(ValueError, match="no buckets"):
        bucket.assign((1, 1), [])


def test_bucket_centre_crop(example) -> None:
    bucket = make_bucket(example)
    assert bucket.deterministic
    # Cover 512x256: scale max(512/1000, 256/600) = 0.512 -> 512x307; (307 - 256) // 2 = 25 rows off the top.
    assert bucket.crop((1000, 600), (512, 256), None) == CropPlan(resize=(512, 307), box=(0, 25, 512, 281))
    rng = random.Random(1)
    state = rng.getstate()
    assert bucket.crop((1000, 600), (512, 256), rng) == CropPlan(resize=(512, 307), box=(0, 25, 512, 281))
    assert rng.getstate() == state  # a deterministic bucket leaves the rng alone


@pytest.mark.parametrize("size", [(1000, 600), (600, 1000), (333, 777), (64, 64), (5000, 100), (513, 511)])
@pytest.mark.parametrize("crop", ["center", "random"])
def test_every_crop_plan_covers_the_bucket_exactly(example, size, crop) -> None:
    bucket = make_bucket(example, crop=crop)
    (target,) = bucket.fit([size])
    plan = bucket.crop(size, target, random.Random(0))
    (rw, rh), (left, top, right, bottom) = plan.resize, plan.box
    assert (right - left, bottom - top) == target
    assert 0 <= left and 0 <= top and right <= rw and bottom <= rh
    assert abs(rw / rh - size[0] / size[1]) <= (size[0] / size[1]) * (1 / min(rw, rh)) + 1e-9  # ratio kept to a pixel


def test_random_crop_draws_from_the_rng(example) -> None:
    bucket = make_bucket(example, crop="random")
    assert not bucket.deterministic
    plans = [bucket.crop((1000, 600), (512, 256), random.Random(seed)) for seed in range(40)]
    assert plans[3] == bucket.crop((1000, 600), (512, 256), random.Random(3))  # reproducible
    tops = {p.box[1] for p in plans}
    assert len(tops) > 5 and min(tops) >= 0 and max(tops) <= 307 - 256
    assert bucket.crop((1000, 600), (512, 256), None).box == (0, 25, 512, 281)  # no rng: centred


# --------------------------------------------------------------------------- text transform
def test_caption_prefix(example) -> None:
    prefix = make_prefix(example, text="my-cat")
    rng = random.Random(0)
    assert prefix(PromptParts("a photo of {caption}", "a red cat"), rng) == PromptParts("a photo of {caption}", "my-cat, a red cat")
    assert prefix(PromptParts("{caption}", ""), rng) == PromptParts("{caption}", "my-cat")
    spaced = make_prefix(example, text="masterpiece", separator=" ")
    assert spaced(PromptParts("{caption}", "cat"), rng).caption == "masterpiece cat"


def test_caption_prefix_probability(example) -> None:
    parts = PromptParts("{caption}", "cat")
    rng = random.Random(0)
    state = rng.getstate()
    make_prefix(example, text="x")(parts, rng)
    assert rng.getstate() == state  # probability 1 draws nothing
    assert make_prefix(example, text="x", probability=0.0)(parts, rng) == parts
    half = make_prefix(example, text="x", probability=0.5)
    decisions = [half(parts, rng).caption != "cat" for _ in range(2000)]
    assert 900 < sum(decisions) < 1100
    first, second = random.Random(5), random.Random(5)
    assert [half(parts, first) for _ in range(50)] == [half(parts, second) for _ in range(50)]  # reproducible


def test_built_components_pickle(example) -> None:
    bucket = pickle.loads(pickle.dumps(make_bucket(example, crop="random")))
    assert bucket.crop((1000, 600), (512, 256), random.Random(7)) == make_bucket(example, crop="random").crop((1000, 600), (512, 256), random.Random(7))
    prefix = pickle.loads(pickle.dumps(make_prefix(example, text="t")))
    assert prefix(PromptParts("{caption}", "c"), random.Random(0)).caption == "t, c"


# --------------------------------------------------------------------------- through hcp, in this process
@pytest.fixture(scope="module")
def registry(example):
    return build_registry(extra_plugins=[core_components, example.plugin])


def test_registration_names_lazy_factories(example, registry) -> None:
    bucket, prefix = registry.buckets.get("multiple_of"), registry.text_transforms.get("caption_prefix")
    assert (bucket.plugin, bucket.config, prefix.config) == ("hcp_plugin_example.plugin", example.plugin.MultipleOfConfig, example.plugin.CaptionPrefixConfig)
    assert bucket.load() is example.buckets.MultipleOfBucket and prefix.load() is example.text.CaptionPrefix


def test_a_pipeline_using_both_components_prepares_its_data(registry, tmp_path) -> None:
    """What the engine does with them: scan the source, fit the bucket, assign, crop, build prompts."""
    write(tmp_path / "images.txt", "a.png 1000 600 a red cat\nb.png 600 1000\nc.png 300 300 sleeping\n")
    pipe = build_pipeline(tomllib.loads(EXAMPLE_PIPELINE), registry)
    ds = pipe.data["ds1"]
    source = ds.sources[0].build(context=SourceContext(registry=registry, base_dir=str(tmp_path), dataset="ds1"))
    records = source.scan().records
    bucket = ds.bucket.build(context=BucketContext(seed=0, dataset="ds1"))
    sizes = bucket.fit([r.size for r in records])
    assert sizes == [(128, 256), (256, 128), (256, 256)]
    assert [sizes[bucket.assign(r.size, sizes)] for r in records] == [(256, 128), (128, 256), (256, 256)]
    rng = random.Random(0)
    prompts = [r.text_transforms[0](PromptParts(r.templates[0], r.caption or ""), rng).caption for r in records]
    assert prompts == ["my-cat, a red cat", "my-cat", "my-cat, sleeping"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.ds1.bucket.multiple=12", ["data.ds1.bucket", "must be a positive multiple of 8, got 12"]),
        ("data.ds1.bucket.crop='left'", ["data.ds1.bucket", "'left'"]),
        ("data.ds1.sources.0.text_transforms=[{ type = 'caption_prefix' }]", ["data.ds1.sources[0].text_transforms[0].text: required key missing"]),
        ("data.ds1.sources.0.text_transforms.0.probability=2.0", ["data.ds1.sources[0].text_transforms[0]", "2.0"]),
        ("data.ds1.bucket.type=multiple_off", ["data.ds1.bucket: unknown bucket 'multiple_off'. Did you mean 'multiple_of'?"]),
    ],
)
def test_bad_configs_of_the_plugin_are_user_errors(registry, override, expected) -> None:
    raw = tomllib.loads(EXAMPLE_PIPELINE)
    apply_override(raw, override)
    with pytest.raises(ConfigError) as err:
        build_pipeline(raw, registry)
    for part in expected:
        assert part in str(err.value)


# --------------------------------------------------------------------------- installed with pip
def pip_install(package: Path, target: Path) -> Path:
    """``pip install`` a local package into ``target`` offline, as a user would (minus isolation)."""
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(package)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"pip install {package.name} failed:\n{done.stdout}\n{done.stderr}"
    return target


@pytest.fixture(scope="module")
def example_target(tmp_path_factory) -> Path:
    """The example package installed by pip into a fresh folder (built from a copy: the build
    writes into its source tree, which must stay clean)."""
    root = tmp_path_factory.mktemp("example")
    source = shutil.copytree(EXAMPLE, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    return pip_install(source, root / "site")


@pytest.fixture(scope="module")
def core_site(tmp_path_factory) -> Path:
    """A fake installed distribution whose ``hcp`` entry point is the test plugin (``core_components``)."""
    return fake_distribution(tmp_path_factory.mktemp("core-site"), "hcp-core-test", {core_components.PLUGIN_NAME: "core_components"})


@pytest.fixture(scope="module")
def example_plugin_env(example_target: Path, core_site: Path) -> Dict[str, str]:
    """Environment for ``python -m hcp_core`` subprocesses that see the pip-installed example plugin."""
    return subprocess_env(example_target, core_site)


def hcp(*argv: str, env: Dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hcp_core", *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def test_pip_installed_only_the_plugin(example_target: Path) -> None:
    """No hcp, torch or anything else came along: the package depends on nothing heavy."""
    assert sorted(p.name for p in example_target.iterdir()) == ["hcp_plugin_example", "hcp_plugin_example-0.1.0.dist-info"]
    entry_points = (example_target / "hcp_plugin_example-0.1.0.dist-info" / "entry_points.txt").read_text()
    assert "[hcp]\nexample = hcp_plugin_example.plugin" in entry_points


def test_hcp_plugins_shows_the_installed_plugin(example_plugin_env, tmp_path) -> None:
    done = hcp("plugins", env=example_plugin_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    at = lines.index("example (hcp-plugin-example 0.1.0) [hcp_plugin_example.plugin]")
    assert lines[at + 1 : at + 3] == ["  buckets: multiple_of", "  text_transforms: caption_prefix"]
    assert "failed to load" not in done.stdout
    assert any(line.startswith("losses (hcp ") for line in lines)  # the built-ins are still there


def test_hcp_config_validates_a_pipeline_using_the_installed_plugin(example_plugin_env, tmp_path) -> None:
    write(tmp_path / "pipe.toml", EXAMPLE_PIPELINE)
    done = hcp("config", "pipe.toml", "data.ds1.bucket.multiple=32", env=example_plugin_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    printed = tomllib.loads(done.stdout)
    assert printed["data"]["ds1"]["bucket"] == {"type": "multiple_of", "max_side": 256, "multiple": 32, "crop": "center"}
    assert printed["data"]["ds1"]["sources"][0]["text_transforms"] == [
        {"type": "caption_prefix", "text": "my-cat", "separator": ", ", "probability": 1.0}
    ]
    typo = hcp("config", "pipe.toml", "data.ds1.bucket.type=multiple_off", env=example_plugin_env, cwd=tmp_path)
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert "data.ds1.bucket: unknown bucket 'multiple_off'. Did you mean 'multiple_of'?" in typo.stderr


def test_a_blocked_plugin_is_not_loaded(example_plugin_env, tmp_path) -> None:
    env = {**example_plugin_env, "HCP_BLOCK_PLUGINS": "example"}
    listed = hcp("plugins", env=env, cwd=tmp_path)
    assert listed.returncode == 0 and "hcp-plugin-example" not in listed.stdout
    write(tmp_path / "pipe.toml", EXAMPLE_PIPELINE)
    done = hcp("config", "pipe.toml", env=env, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert ("bucket 'multiple_of' is provided by plugin 'example' (from distribution hcp-plugin-example), "
            "which is blocked by HCP_BLOCK_PLUGINS ('example')") in done.stderr
    assert "example: blocked by HCP_BLOCK_PLUGINS" in listed.stdout.splitlines()


BROKEN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "hcp-broken-plugin"
version = "0.0.1"

[project.entry-points.hcp]
broken = "hcp_broken_plugin"

[tool.setuptools]
py-modules = ["hcp_broken_plugin"]
"""


def test_a_broken_installed_plugin_is_reported_and_the_others_still_work(tmp_path_factory, example_target, core_site, tmp_path) -> None:
    source = tmp_path_factory.mktemp("broken-src")
    write(source / "pyproject.toml", BROKEN_PYPROJECT)
    write(source / "hcp_broken_plugin.py", "raise ImportError('hcp-broken-plugin needs libfoo')\n")
    broken_target = pip_install(source, tmp_path_factory.mktemp("broken") / "site")
    env = subprocess_env(broken_target, example_target, core_site)
    done = hcp("plugins", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "hcp failed to load plugin 'broken' (from distribution hcp-broken-plugin): ImportError: hcp-broken-plugin needs libfoo" in done.stdout
    assert "example (hcp-plugin-example 0.1.0) [hcp_plugin_example.plugin]" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    write(tmp_path / "pipe.toml", EXAMPLE_PIPELINE)
    config = hcp("config", "pipe.toml", env=env, cwd=tmp_path)
    assert config.returncode == 0, config.stderr
    assert tomllib.loads(config.stdout)["data"]["ds1"]["bucket"]["type"] == "multiple_of"


def test_hcp_run_trains_with_the_installed_plugins_bucket_and_transform(example_plugin_env, tmp_path, demo_model_dir, demo_data_dir) -> None:
    """The pip-installed plugin's components, named in TOML, carry a real training run."""
    from train_support import pipeline_toml

    text = pipeline_toml(demo_model_dir, demo_data_dir, tmp_path / "exp", max_steps=2)
    text = text.replace('{ type = "ratio", from = "images", target_area = 4096, step = 8, num_buckets = 2 }',
                        '{ type = "multiple_of", max_side = 64, multiple = 16 }')
    text = text.replace('prompt_template = "a picture of {caption}"',
                        'prompt_template = "a picture of {caption}"\ntext_transforms = [{ type = "caption_prefix", text = "my-shape" }]')
    write(tmp_path / "pipe.toml", text)
    done = hcp("run", "pipe.toml", env={**example_plugin_env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "exp" / "train.log").read_text()
    assert "bucket multiple_of" in log and "done: 2 steps" in log
    assert (tmp_path / "exp" / "lora.safetensors").is_file()
