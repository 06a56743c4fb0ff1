"""Metric names out of PromQL expressions, and every expression of k2ray's dashboards and rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
DASHBOARDS_DIR = ROOT / "k8s" / "grafana" / "dashboards"
RULES_DIR = ROOT / "k8s" / "prometheus" / "rules"
# Grafana's variables, as an ad-hoc query would have them: every pool, replica and model; a 1m rate window.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$pool": ".*", "$replica": ".*", "$model": ".*"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"})


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (functions, keywords, labels and literals left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _LABEL_LIST.sub(" ", text)
    return {m.group(1) for m in _IDENTIFIER.finditer(text)
            if m.group(2) is None and m.group(1).lower() not in _KEYWORDS}


def rule_groups() -> list[dict]:
    return [group for path in sorted(RULES_DIR.glob("*.yaml")) for group in yaml.safe_load(path.read_text())]


def rule_expressions() -> dict[str, str]:
    """`record` or `alert` name -> expression."""
    return {rule.get("record") or rule["alert"]: rule["expr"] for group in rule_groups() for rule in group["rules"]}


def recorded_names() -> set[str]:
    return {rule["record"] for group in rule_groups() for rule in group["rules"] if "record" in rule}


def dashboard_expressions() -> dict[str, str]:
    """"dashboard / panel / refId" -> expression, Grafana variables substituted."""
    exprs = {}
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                exprs[f"{path.stem} / {panel['title']} / {target['refId']}"] = substitute(target["expr"])
        for variable in dashboard["templating"]["list"]:
            if variable["type"] == "query":
                query = re.fullmatch(r"label_values\((.*), \w+\)", variable["query"]["query"])
                assert query, variable
                exprs[f"{path.stem} / ${variable['name']}"] = substitute(query.group(1))
    return exprs


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr
