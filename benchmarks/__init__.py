"""The benchmark harness (issue #6): ``python -m benchmarks.run --quick|--full``; see ``benchmarks/run.py``.

run.py             the entry point: modes, groups, reports
plan.py            rows, modes and the plan each group process reads
groups.py          one group of rows in its own process (a Ray head per group), and the deploy cost
heads.py           benchmark ports and each head's data path
measure.py         HTTP points through loadgen.py, in-process calls
loadgen.py         closed-loop HTTP/1.1 keep-alive load generator (the role of wrk)
models.py          the example flow's XGBoost model and its ONNX export, stored for our replicas
handwritten.py     the hand-written Serve deployment
fastapi_server.py  the FastAPI + uvicorn baseline
report.py          ratios, targets, Markdown and PNG
"""
