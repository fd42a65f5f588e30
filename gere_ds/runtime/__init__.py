"""The processes of a job: ranks and collectives that also work in one plain process,
pre-emption, and the pre-flight checks run before training (launcher side and every rank)."""
