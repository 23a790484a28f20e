"""`conduit validate` refuses a draft model whose tokenizer is not its target's (issue 20): its ids
would name other tokens, so nearly every draft would be rejected at a cost."""

import shutil
import subprocess
import sys

import yaml
from transformers import AutoTokenizer

from app.config import PROJECT_ROOT


def config_with_draft(tmp_path, target, draft):
    raw = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    model = raw["applications"][0]["args"]["models"][0]
    model.update(source=str(target), build_demo_if_missing=False)
    model["engine"]["speculative"] = {"method": "draft_model", "draft_model": str(draft)}
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def validate(path):
    return subprocess.run([sys.executable, "-m", "app.cli", "validate", str(path)], capture_output=True, text=True,
                          cwd=PROJECT_ROOT)


def test_draft_with_the_targets_tokenizer_is_accepted(tmp_path, model_path):
    res = validate(config_with_draft(tmp_path, model_path, model_path))
    assert res.returncode == 0, res.stderr


def test_draft_with_another_vocabulary_is_refused_naming_the_field(tmp_path, model_path):
    draft = tmp_path / "draft"
    shutil.copytree(model_path, draft)
    tokenizer = AutoTokenizer.from_pretrained(draft)
    tokenizer.add_tokens(["<not-in-the-target>"])
    tokenizer.save_pretrained(draft)
    res = validate(config_with_draft(tmp_path, model_path, draft))
    assert res.returncode == 1, res.stdout
    assert "applications[0].args.models[0].engine.speculative.draft_model" in res.stderr
    assert "different vocabulary" in res.stderr
