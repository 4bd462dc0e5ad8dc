"""A run folder (``<output_dir>/.spyke/<run_id>/``): its layout, its event journal, its command
channel, and finding runs on disk."""
