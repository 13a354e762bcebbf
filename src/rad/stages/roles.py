"""The four models of a run, by the names its eval folders, speed rows and reports use (shared by the
evaluation and speed stages and every orchestrator that reads them)."""

TEACHER, DRAFT, RAD, BASELINE = ROLES = ("teacher", "draft (searched layers skipped)", "RAD student", "baseline student")
