"""The process link between the web process and the model worker: the web side's proxy (`remote.WorkerEngine`,
a `core.engine_api.ServingEngine`), the worker process at the other end (`worker`), and what crosses between
them: PCM in shared-memory rings (`shm_ring`), control messages (`messages`), memory bytes as files (`bulk`).
Torch-free: the worker imports the model (`step.build_engine`) only after the spawn."""
