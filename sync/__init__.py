"""Wave -> Dataverse sync: webhook intake, contact worker, backfill, mapping, Dataverse and Wave clients."""
