"""The experiment record: every file a sweep writes, what each holds, the trial states and the
best FID, owned here alone. `sweeps` writes through it; `analysis` and `sweep status` read
through it. It depends on `diffusion_lib`'s torch-free modules only, so readers start fast.

    <storage>/<name>/
        sweep.json                  the spec's metric, mode and searched distributions (files.SweepFile)
        experiment_summary.json     each trial's final state and error, when the sweep ends (files.Summary)
        driver.lock                 host and pid of the `sweep run` driving it now; driver.ended once it
                                    ended (driver_lock)
        fid_reference/*.npz         the FID reference statistics every trial uses, computed once
        events.out.tfevents.*.hparams   TensorBoard's HParams columns for all trials
        experiment_state-*.json     Ray Tune's own state (read for the trial states, never written)
        <trial_id>_<label>/         one folder per trial, with
            trial.json              searched values, full config, node (files.TrialFile)
            metrics.jsonl, events…, samples/   (diffusion_lib.run_files)
            events.out.tfevents.session_end   its HParams status, once it ended (sweeps.session_end)
            checkpoint_*/step_*.pt  Ray Tune's checkpoints of the trainer's state, each with the
                                    metrics.jsonl of its report (what repair puts lost rows back from)
            error.txt               Ray Tune's traceback of a failed attempt
"""
