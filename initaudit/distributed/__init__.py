"""Audits spread over processes: a sharded live model measured where it lives, a checkpoint's work units split
over ranks or Ray tasks; partial summaries merged into one report."""
