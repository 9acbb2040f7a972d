"""The Géoplateforme warehouse ("Entrepôt") API under `/api`, self-hosted.

Producers upload georeferenced images, checks run, a processing execution computes a ROK4 pyramid
(a *stored data*), a *configuration* describes a layer and an *offering* publishes it on an
endpoint. Routes, bodies and statuses follow the platform so IGN's SDK (`egpf`) and scripts
written for it work unchanged. Stored data, offerings and published layers are the same records
the ROK4 admin API manages.
"""
