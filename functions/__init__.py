"""The top floor: the Functions trigger and route modules (the only modules that import azure.functions)
and the composition root (`services`) that builds every client they hand down to oauth/ and sync/."""
