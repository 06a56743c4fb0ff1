from __future__ import annotations

import json
from pathlib import Path

import pytest

from k2ray.billing import BillingConfig, KeyStore, Ledger
from k2ray.cli import main

from .test_ledger import make_record


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "serve.yaml"
    path.write_text(f"router:\n  num_replicas: 1\nbilling:\n  ledger: {tmp_path / 'ledger.db'}\n"
                    f"  key_hash_iterations: 100\n")
    return path


def _run(capsys: pytest.CaptureFixture, *argv: str) -> list[str]:
    main(list(argv))
    return capsys.readouterr().out.splitlines()


def test_keys_create_list_revoke(config_file: Path, capsys: pytest.CaptureFixture) -> None:
    lines = _run(capsys, "keys", "create", "--config", str(config_file), "--name", "alice", "--plan", "moonshot",
                 "--rpm", "3", "--budget-usd", "10.25")
    record, secret = json.loads(lines[0]), lines[-1]
    assert secret.startswith(f"sk-{record['key_id']}.")
    assert (record["plan"], record["rpm"], record["budget_usd"]) == ("moonshot", 3, "10.25")
    ledger = Ledger.open(BillingConfig.model_validate({"ledger": str(config_file.parent / "ledger.db")}).ledger)
    assert KeyStore(ledger.engine).verify(secret).key_id == record["key_id"]
    listed = [json.loads(line) for line in _run(capsys, "keys", "list", "--config", str(config_file))]
    assert [k["key_id"] for k in listed] == [record["key_id"]]
    assert secret not in json.dumps(listed)
    assert _run(capsys, "keys", "revoke", record["key_id"], "--config", str(config_file)) == [
        f"revoked {record['key_id']}"]
    assert KeyStore(ledger.engine).verify(secret) is None
    with pytest.raises(SystemExit, match="no live key"):
        main(["keys", "revoke", record["key_id"], "--config", str(config_file)])
    with pytest.raises(SystemExit, match="unknown plan"):
        main(["keys", "create", "--config", str(config_file), "--name", "bob", "--plan", "nope"])
    ledger.close()


def test_usage_json_and_csv(config_file: Path, capsys: pytest.CaptureFixture) -> None:
    ledger = Ledger.open(str(config_file.parent / "ledger.db"))
    ledger.write([make_record("a1", day=0), make_record("a2", day=1), make_record("b1", key_id="key-b", day=1)])
    ledger.close()
    body = json.loads(_run(capsys, "usage", "--config", str(config_file), "--key-id", "key-a")[0])
    # 60 x 556,000 + 40 x 139,000 + 10 x 2,222,000 pico per record
    assert body["totals"]["cost_usd"] == "0.00012228" and body["totals"]["requests"] == 2
    assert [d["day"] for d in body["days"]] == ["2025-12-01", "2025-12-02"]
    everyone = json.loads(_run(capsys, "usage", "--config", str(config_file), "--since", "2025-12-02")[0])
    assert everyone["totals"]["requests"] == 2 and sorted(everyone["keys"]) == ["key-a", "key-b"]
    rows = _run(capsys, "usage", "--config", str(config_file), "--key-id", "key-a", "--format", "csv")
    assert rows[0].startswith("day,requests,input_tokens") and rows[-1].startswith("total,2,120,80,20,8,0,")
    assert rows[-1].endswith(",0.00012228") and len(rows) == 4
