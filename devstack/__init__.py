"""Local stand-ins for what cannot run here (Dataverse, Wave, Key Vault), process helpers for what can
(Azurite, the Entra stand-in), and the dev host that plays the Functions host."""
