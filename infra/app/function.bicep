// Flex Consumption (FC1) Linux plan and the Python 3.11 function app, running as the user-assigned
// identity. Every app setting is listed in one place below; tests/test_infra.py compares them with the
// settings the code reads (core/settings.py APP_SETTINGS).
param name string
param planName string
param location string
param tags object
param identityName string
param storageAccountName string
param deploymentContainerName string
param applicationInsightsName string
param keyVaultName string
param dynamicsClientSecretUri string
param waveWebhookSecretsUri string
param waveApiTokenUri string
param dynamicsClientId string
param waveApiBaseUrl string
param waveReturnUrlPrefixes string
param oauthRedirectUri string = ''
param maximumInstanceCount int = 100
param instanceMemoryMB int = 2048

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' existing = {
  name: identityName
}

resource storage 'Microsoft.Storage/storageAccounts@2025-06-01' existing = {
  name: storageAccountName
}

resource applicationInsights 'Microsoft.Insights/components@2020-02-02' existing = {
  name: applicationInsightsName
}

resource vault 'Microsoft.KeyVault/vaults@2024-11-01' existing = {
  name: keyVaultName
}

resource plan 'Microsoft.Web/serverfarms@2025-03-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2025-03-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': 'api'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    keyVaultReferenceIdentity: identity.id
    siteConfig: {
      minTlsVersion: '1.2'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
}

// azd deploys with an Entra token; publishing with basic (user/password) credentials stays off.
resource ftpPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2025-03-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmPublishing 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2025-03-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

var redirectUri = empty(oauthRedirectUri) ? 'https://${functionApp.properties.defaultHostName}/api/oauth/callback' : oauthRedirectUri

resource appSettings 'Microsoft.Web/sites/config@2025-03-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: {
    // Functions host storage through the identity (no AzureWebJobsStorage connection string exists).
    AzureWebJobsStorage__credential: 'managedidentity'
    AzureWebJobsStorage__clientId: identity.properties.clientId
    AzureWebJobsStorage__blobServiceUri: storage.properties.primaryEndpoints.blob
    AzureWebJobsStorage__queueServiceUri: storage.properties.primaryEndpoints.queue
    AzureWebJobsStorage__tableServiceUri: storage.properties.primaryEndpoints.table
    // Application Insights with Entra authentication (the component refuses instrumentation-key-only ingestion).
    APPLICATIONINSIGHTS_CONNECTION_STRING: applicationInsights.properties.ConnectionString
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.properties.clientId};Authorization=AAD'
    // The Python worker runs every synchronous function on one pool of this many threads (unset: min(32, cores + 4)).
    // 64 = both queue functions' batchSize 16 + newBatchThreshold 8 (host.json) in flight, which may wait out a
    // Dataverse penalty of up to 3 s in-process (sync/backfill.py), plus 16 so HTTP never waits behind them. local.settings.example.json holds the
    // same value (tests/test_infra.py), and the local stack runs with it.
    PYTHON_THREADPOOL_THREAD_COUNT: '64'
    // The host reads a whole request body before the function runs (default limit 100 MB), also on the
    // anonymous webhook route: 260 KiB is just above the webhook's own 256 KiB (sync/events.py
    // MAX_BODY_BYTES, answered with a JSON 413), and far above any other route's body
    // (https://learn.microsoft.com/azure/azure-functions/functions-app-settings#functions_request_body_size_limit).
    FUNCTIONS_REQUEST_BODY_SIZE_LIMIT: '266240'
    // The app's own settings (core/settings.py).
    APP_ENV: 'production'
    AZURE_CLIENT_ID: identity.properties.clientId
    KEY_VAULT_URL: vault.properties.vaultUri
    DYNAMICS_CLIENT_ID: dynamicsClientId
    DYNAMICS_CLIENT_SECRET: '@Microsoft.KeyVault(SecretUri=${dynamicsClientSecretUri})'
    OAUTH_REDIRECT_URI: redirectUri
    WAVE_WEBHOOK_SECRETS: '@Microsoft.KeyVault(SecretUri=${waveWebhookSecretsUri})'
    WAVE_API_BASE_URL: waveApiBaseUrl
    WAVE_API_TOKEN: '@Microsoft.KeyVault(SecretUri=${waveApiTokenUri})'
    WAVE_RETURN_URL_PREFIXES: waveReturnUrlPrefixes
  }
}

output name string = functionApp.name
output uri string = 'https://${functionApp.properties.defaultHostName}'
output oauthRedirectUri string = redirectUri
