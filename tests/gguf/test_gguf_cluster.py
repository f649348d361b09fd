"""`plan --cluster` on a GGUF file: the architecture comes from the header, the engines load the HF release."""
import json

from hybridmoe.cli import main


def test_cluster_plan_from_a_gguf_header(gguf_models, capsys):
    _, path = gguf_models("deepseek_v3")
    capsys.readouterr()
    assert main(["plan", str(path), "--cluster", "1x2:H100-80GB", "--json", "--gpus", "1x24GiB",
                 "--ram", "64GiB"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["model"]["model_type"] == "deepseek_v3" and p["model"]["dtype"].startswith("fp8")  # as DeepSeek ships it
    assert any("HF_CHECKPOINT" in n for n in p["notes"])
    for e in p["engines"].values():
        assert e["fits"] and "HF_CHECKPOINT" in e["commands"][0]["argv"]
    assert p["local"]["verdict"] == "fits" and str(path) in p["local"]["text"]
