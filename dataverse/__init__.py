"""A Dataverse Web API client, shaped like Microsoft's PowerPlatform-DataverseClient-Python: the request
loop (`transport`), the operations contact sync uses (`client`), the error tree (`errors`), the `$batch`
codec (`batch`) and the OData query text (`odata`). It imports nothing of oauth/ or sync/."""
