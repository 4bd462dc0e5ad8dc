"""kohya sd-scripts' contract in one place: the file names a run writes (``names``), the ``ss_*`` /
``modelspec.*`` metadata of a LoRA file (``metadata``, ``dataset_metadata``) and its hashes (``hashes``)."""
