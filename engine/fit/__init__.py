"""Will the run fit: memory estimate, device memory, the Mac's allocator settings, staying awake."""
