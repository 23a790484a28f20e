"""The model deployment takes every call its engine may hold, so the engine's per-key queue share,
not Serve's key-blind queue, is what refuses a flood (docs/qos.md): the builder derives
`max_ongoing_requests` from the engine config, and `conduit validate` refuses a lower one."""

import yaml
from typer.testing import CliRunner

from app.cli import cli
from app.config import PROJECT_ROOT, parse_app_config
from app.resources import max_ongoing_requests


def test_derived_from_slots_borrowed_slots_queue_and_channels():
    (model,) = parse_app_config({"models": [{"name": "m", "source": "x",
                                             "engine": {"max_num_seqs": 32, "max_waiting": 64}}]}).models
    assert max_ongoing_requests(model.engine) == 32 + 4 + 2 * 64 + 16
    (small,) = parse_app_config({"models": [{"name": "m", "source": "x",
                                             "engine": {"max_num_seqs": 2, "max_waiting": 3}}]}).models
    assert max_ongoing_requests(small.engine) == 2 + 1 + 6 + 16  # at least one borrowed slot


def test_the_builder_gives_the_model_deployment_that_value(tmp_path):
    from app.build import build_app

    model = tmp_path / "model"
    args = {"models": [{"name": "m", "source": str(model), "build_demo_if_missing": True,
                        "engine": {"max_num_seqs": 8, "max_waiting": 20}}]}
    assert _model_max_ongoing_requests(build_app(args)) == 8 + 1 + 40 + 16


def _model_max_ongoing_requests(app) -> int:
    """The Model deployment's max_ongoing_requests, found among the Ingress's bound arguments."""
    models = app._bound_deployment.init_args[2]
    (model,) = models.values()
    return model._bound_deployment._deployment_config.max_ongoing_requests


def test_validate_refuses_a_lower_value_and_names_the_rule(tmp_path):
    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    (app,) = raw["applications"]
    model = next(d for d in app["deployments"] if d["name"].startswith("Model-"))
    model["max_ongoing_requests"] = 64
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(cli, ["validate", str(config)])
    assert result.exit_code == 1
    assert "max_ongoing_requests: 64 is below what args.models[0].engine may hold, 180" in result.output
    model["max_ongoing_requests"] = 180
    config.write_text(yaml.safe_dump(raw))
    assert CliRunner().invoke(cli, ["validate", str(config)]).exit_code == 0
