"""PicoQuant instruments (HydraHarp 400, MultiHarp 150/160 through the vendor's snAPI)."""
