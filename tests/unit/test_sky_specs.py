"""Every tier spec parses with SkyPilot's own parser and its service validates, offline.

Only `sky.Task.from_yaml` and `sky.serve.validate_service_task` are called: no launch, no
--dryrun, no `sky check`, nothing that needs the catalog or starts the API server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deploy import planner, specs
from deploy.errors import SpecError

sky = pytest.importorskip("sky")
import sky.serve  # noqa: E402

SKY_DIR = Path(__file__).resolve().parents[2] / "sky"
VLLM_TIERS = ["tiny", "small", "medium"]


@pytest.mark.parametrize("path", sorted(SKY_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_spec_parses_with_sky(path: Path) -> None:
    task = sky.Task.from_yaml(str(path))
    assert task.run
    if path.stem in VLLM_TIERS:
        sky.serve.validate_service_task(task, pool=False)


def test_no_python_package_named_sky() -> None:
    assert not (SKY_DIR / "__init__.py").exists()


@pytest.mark.parametrize("tier", VLLM_TIERS)
def test_vllm_spec_contract(tier: str) -> None:
    config = yaml.safe_load((SKY_DIR / f"{tier}.yaml").read_text())
    envs = config["envs"]
    assert envs["MODEL_ID"].startswith("mistralai/") and int(envs["MAX_MODEL_LEN"]) > 0
    assert set(config["secrets"]) == {"HF_TOKEN", "VLLM_API_KEY"}
    assert all(v is None for v in config["secrets"].values())  # never a value in the file
    run = config["run"]
    for flag in ("--tensor-parallel-size \"$SKYPILOT_NUM_GPUS_PER_NODE\"",
                 "--enable-prefix-caching", "--api-key \"$VLLM_API_KEY\"", "--tokenizer-mode"):
        assert flag in run
    probe = config["service"]["readiness_probe"]
    assert probe["headers"]["Authorization"] == "Bearer $VLLM_API_KEY"
    assert probe["initial_delay_seconds"] >= 600


def test_small_probe_delay_is_realistic_for_mixtral() -> None:
    config = yaml.safe_load((SKY_DIR / "small.yaml").read_text())
    assert config["service"]["readiness_probe"]["initial_delay_seconds"] >= 1200


@pytest.mark.parametrize("tier", VLLM_TIERS)
def test_accelerator_names_are_known(tier: str) -> None:
    spec = specs.load_spec(tier, SKY_DIR)
    names = specs.spec_accelerators(spec)
    assert names and set(names) <= set(planner.known_accelerators())
    specs.check_accelerators(spec)


@pytest.mark.parametrize("tier", VLLM_TIERS)
def test_every_alternative_fits_the_model(tier: str) -> None:
    config = yaml.safe_load((SKY_DIR / f"{tier}.yaml").read_text())
    arch, memory = planner.TIER_MODELS[tier], planner.known_accelerators()
    context = int(config["envs"]["MAX_MODEL_LEN"])
    for name, count in config["resources"]["accelerators"].items():
        assert planner.size(arch, name, count, memory[name], context).fits, (name, count)


def test_secret_fills_the_probe_header() -> None:
    spec = specs.load_spec("small", SKY_DIR)
    task = sky.Task.from_yaml_config(dict(spec.config),
                                     secrets_overrides=[("VLLM_API_KEY", "k-123")])
    assert task.service.readiness_headers == {"Authorization": "Bearer k-123"}


def test_rendered_overrides_validate() -> None:
    spec = specs.render(specs.load_spec("small", SKY_DIR), specs.Overrides(
        gpus="h100:2", spot=True, min_replicas=2, max_replicas=3, cloud="aws",
        region="us-east-1", envs={"VLLM_EXTRA_ARGS": "--enable-expert-parallel"}))
    specs.validate(spec, {"VLLM_API_KEY": "k"})
    assert spec.config["resources"]["accelerators"] == "H100:2"
    assert spec.config["resources"]["use_spot"] is True
    policy = spec.config["service"]["replica_policy"]
    assert policy["base_ondemand_fallback_replicas"] == 1
    assert (policy["min_replicas"], policy["max_replicas"]) == (2, 3)
    assert spec.envs["VLLM_EXTRA_ARGS"] == "--enable-expert-parallel"


def test_render_leaves_the_original_untouched() -> None:
    spec = specs.load_spec("tiny", SKY_DIR)
    specs.render(spec, specs.Overrides(gpus="L4:2", spot=True))
    assert spec.config["resources"]["use_spot"] is False
    assert isinstance(spec.config["resources"]["accelerators"], dict)


def test_no_spot_removes_fallback_keys() -> None:
    spot = specs.render(specs.load_spec("tiny", SKY_DIR), specs.Overrides(spot=True))
    back = specs.render(spot, specs.Overrides(spot=False))
    specs.validate(back)
    assert "base_ondemand_fallback_replicas" not in back.config["service"]["replica_policy"]


@pytest.mark.parametrize("overrides, message", [
    (specs.Overrides(gpus="B9000:2"), "unknown accelerator"),
    (specs.Overrides(gpus="H100:x"), "integer"),
    (specs.Overrides(min_replicas=3, max_replicas=1), "min"),
])
def test_bad_overrides_are_spec_errors(overrides: specs.Overrides, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        specs.render(specs.load_spec("small", SKY_DIR), overrides)


def test_skypilot_rejects_bad_config(tmp_path: Path) -> None:
    broken = yaml.safe_load((SKY_DIR / "small.yaml").read_text())
    broken["service"]["readiness_probe"]["no_such_field"] = 1
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(broken))
    with pytest.raises(SpecError, match="SkyPilot rejects"):
        specs.validate(specs.load_spec("small", tmp_path))


def test_missing_tier_names_known_ones() -> None:
    with pytest.raises(SpecError, match="known: .*small"):
        specs.load_spec("huge", SKY_DIR)
