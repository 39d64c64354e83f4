"""The composition root: the process `midgate coordinator serve` runs, assembled in one place (assembly.py), its
HTTP routers mounted in one module (http.py), its logging and event loop set up in one place (runtime.py)."""
