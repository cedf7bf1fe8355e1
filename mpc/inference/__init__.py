"""Inference export and the acceleration study (PAPERS.md §3, "Does Form Follow Function?").

    module    InferenceDLRM: a trained DLRM rebuilt from plain ops (exportable)
    export    the runtimes (eager, torch.export, torch.compile, ONNX Runtime, OpenVINO):
              which are installed, compile_model, check_outputs
    costs     FLOPs and bytes per inference, analytically
    timing    LLC size, pinned threads, interleaved latency measurement
    workload  uniform / Zipf input batches
    study     the sweeps (quick_study, full_study) and run_study -> tidy rows
    bench     `python -m mpc bench inference`

Typical use (a notebook)::

    from mpc.inference import study
    result = study.run_study(study.quick_study())
    frame = result.frame(); study.speedup_summary(frame); result.save("results/....json")
"""
