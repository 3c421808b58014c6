"""guidellm (a widely used third-party load tool, `guidellm run`) against a real cluster: every request of a
constant-rate synthetic run must succeed. guidellm sends vLLM extensions (`stream_options.continuous_usage_stats`)
and fields this server does not know, which is what this test guards."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.cluster import Cluster, ClusterConfig

pytestmark = pytest.mark.slow

NUM_REQUESTS = 20


def test_guidellm_run_completes_every_request(random_checkpoint, tmp_path):
    checkpoint = random_checkpoint()
    config = ClusterConfig(str(checkpoint), kv_mode="fp16", port=0)
    report = tmp_path / "guidellm.json"
    with Cluster(config) as cluster:
        result = subprocess.run(
            [sys.executable, "-m", "guidellm", "run",
             "--backend", f"kind=openai_http,target={cluster.url},model={config.served_model_name}",
             "--profile", "kind=constant,rate=4",
             "--constraint", f"kind=max_requests,count={NUM_REQUESTS}",
             "--data", "kind=synthetic_text,prompt_tokens=48,output_tokens=24",
             "--tokenizer", f"kind=hf_auto,model={checkpoint}",
             "--output", f"kind=json,path={report}",
             "--disable-console-interactive"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    benchmark = json.loads(report.read_text())["benchmarks"][0]
    made = benchmark["scheduler_metrics"]["requests_made"]
    assert made == {"successful": NUM_REQUESTS, "errored": 0, "incomplete": 0, "total": NUM_REQUESTS}
