"""The train wing: staged training (`loop`), its run folders and resumption (`run_dir`), data sets (`data`),
evaluation beside timing (`evaluation`) and the lmms-eval adapter (`lmms_adapter`)."""
