"""Inference export and the acceleration study (PAPERS.md §3, "Does Form Follow Function?").

    module    InferenceDLRM: a trained DLRM rebuilt from plain ops (exportable)
    export    the runtimes (eager, torch.export, torch.compile, ONNX Runtime, OpenVINO):
              which are installed, compile_model, check_outputs
    costs     FLOPs and bytes per inference, analytically
    timing    LLC size, pinned threads, interleaved latency measurement
    workload  uniform / Zipf input batches
    study     the sweeps, named sets (study_config: quick, default, paper) and
              run_study -> tidy rows
    analysis  summaries for notebook 06 and the report: speed-up per runtime and per
              design point, reference latency, the paper's numbers beside ours, the claim
    bench     `python -m mpc bench inference [--set quick|default|paper]`

Typical use (a notebook)::

    from mpc.inference import analysis, study
    result = study.run_study(study.study_config("quick"))
    frame = result.frame(); analysis.runtime_summary(frame); result.save("results/....json")
"""
