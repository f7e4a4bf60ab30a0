"""The run's report: terminal tables (terminal), files on disk (files), markdown, html, plots,
rows they share, and the progress display."""
