"""Config as plain data: YAML defaults, a task's YAML, an optional user file, dotted CLI overrides.

Every key a user sets must already exist in the defaults, with a value of the same type; mistakes are
ConfigErrors naming the key (and the closest valid key).
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"

# Keys whose value must be one of a few words (the registries check backbone names themselves).
CHOICES: dict[str, tuple[str, ...]] = {
    "data.train_crop": ("random_resized", "resize_random_crop", "resize"),
    "data.eval_mode": ("resize_crop", "resize"),
    "model.attention": ("paper", "light"),
    "model.attention_map_init": ("positive", "authors"),
    "model.perception": ("shared", "per_attribute"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("cosine", "step", "constant"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.loss": ("bce", "focal"),
    "train.pos_weight": ("none", "balanced"),
    "train.on_nonfinite": ("stop", "skip"),
    "data.on_bad_image": ("fail", "skip"),
}
# Keys whose default is null but that take text when set.
NULLABLE_TEXT = ("output_dir", "model.pretrained", "train.resume")


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}. Mappings are sections, everything else a value."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, leaf = dotted.split(".")
    for section in sections:
        tree = tree.setdefault(section, {})
    tree[leaf] = value


def get_dotted(tree: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _unknown_key(key: str, valid: Iterable[str], source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _coerce(key: str, value: Any, default: Any, source: str) -> Any:
    """``value`` checked against the type of ``default``; ints pass as floats."""
    if value is None and (default is None or key in NULLABLE_TEXT):
        return None
    if default is None or key in NULLABLE_TEXT:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
    expected = "text or null" if default is None or key in NULLABLE_TEXT else type(default).__name__
    raise ConfigError(f"{source}: {key} must be {expected}, got {value!r} ({type(value).__name__})")


def _check_choice(key: str, value: Any, source: str) -> None:
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{source}: {key} must be one of {', '.join(CHOICES[key])}, got {value!r}")


def parse_override(item: str) -> tuple[str, str]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"command line: expected KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    return key.strip(), raw


def apply(cfg: dict[str, Any], updates: dict[str, Any], source: str, raw_text: bool = False) -> None:
    """Set flat ``updates`` on ``cfg`` after checking keys, types and choices."""
    valid = flatten(cfg)
    for key, value in updates.items():
        if key not in valid:
            raise _unknown_key(key, valid, source)
        default = valid[key]
        if raw_text:
            # Command-line text: YAML typing ("3" -> 3, "null" -> None), but text keys keep the text
            # as written, so train.mixed_precision=no stays "no" rather than YAML's False.
            text = value
            try:
                value = yaml.safe_load(text) if text != "" else ""
            except yaml.YAMLError:
                value = text
            if isinstance(default, str) and value is not None:
                value = text
        value = _coerce(key, value, default, source)
        _check_choice(key, value, source)
        set_dotted(cfg, key, value)


def load_config(task: str, config_file: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """defaults.yaml < configs/<task>.yaml < demo section (when data.root is demo) < config_file < overrides."""
    cfg = read_yaml(CONFIG_DIR / "defaults.yaml")
    task_yaml = read_yaml(CONFIG_DIR / f"{task}.yaml")
    demo = task_yaml.pop("demo", {})
    for key, value in flatten(task_yaml).items():
        set_dotted(cfg, key, value)  # a task may add its own keys
    user = flatten(read_yaml(config_file)) if config_file else {}
    cli = dict(parse_override(item) for item in overrides)
    root = cli.get("data.root", user.get("data.root", get_dotted(cfg, "data.root")))
    if root == "demo":
        apply(cfg, flatten(demo), f"configs/{task}.yaml (demo)")
    if user:
        apply(cfg, user, str(config_file))
    apply(cfg, cli, "command line", raw_text=True)
    for key, value in flatten(cfg).items():
        _check_choice(key, value, f"configs/{task}.yaml")
    return cfg


def dump(cfg: dict[str, Any]) -> str:
    return yaml.safe_dump(copy.deepcopy(cfg), sort_keys=False)
