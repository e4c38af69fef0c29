// Wave → Dynamics 365 contact sync: everything `azd up` creates, in one resource group.
// Modules are local files so nothing is fetched from a registry at build time.
targetScope = 'subscription'

@minLength(1)
@maxLength(64)
@description('Name of the azd environment; seeds the unique resource names and the resource group name.')
param environmentName string

@minLength(1)
@description('Region for every resource. It must offer Flex Consumption: az functionapp list-flexconsumption-locations')
@metadata({
  azd: {
    type: 'location'
  }
})
param location string

@description('Resource group to create; empty means rg-<environmentName>.')
param resourceGroupName string = ''

@minLength(1)
@description('Application (client) id of the multi-tenant Entra app registration that signs admins in to Dynamics 365.')
param dynamicsClientId string

@secure()
@minLength(1)
@description('Client secret of that app registration. Stored in Key Vault; the app reads it through a Key Vault reference.')
param dynamicsClientSecret string

@secure()
@minLength(1)
@description('Comma-separated HMAC secrets Wave signs webhooks with (current first; two during a rotation).')
param waveWebhookSecrets string

@secure()
@minLength(1)
@description('Bearer token for Wave\'s contacts API, read by the backfill.')
param waveApiToken string

@minLength(1)
@description('Base URL of Wave\'s contacts API (https).')
param waveApiBaseUrl string

@minLength(1)
@description('Comma-separated https prefixes a connect call\'s return_url must start with.')
param waveReturnUrlPrefixes string

@description('Redirect URI registered on the app registration; empty means https://<function app default host>/api/oauth/callback. Set it when the app is served on a custom domain.')
param oauthRedirectUri string = ''

@description('Upper bound of Flex Consumption instances.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 100

@description('Memory of each Flex Consumption instance.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Days a deleted Key Vault (and its secrets) stays recoverable; purge protection keeps the name reserved that long.')
@minValue(7)
@maxValue(90)
param keyVaultSoftDeleteRetentionInDays int = 90

// Queues and tables the code uses (core/storage.py names the queues; tests/test_infra.py checks both lists).
// Each queue has its "-poison" twin, where the Functions host moves a message after maxDequeueCount failures.
var queueNames = [
  'contact-events'
  'contact-events-poison'
  'backfill-pages'
  'backfill-pages-poison'
]
var tableNames = [
  'connections'
  'oauthsessions'
  'pendingsignins'
  'contactstate'
  'contactsnapshots'
  'contactholders'
  'dataversebudget'
  'contactdrains'
  'failures'
  'ownercache'
  'backfillruns'
]

var resourceToken = toLower(uniqueString(subscription().id, environmentName, location))
var tags = {
  'azd-env-name': environmentName
}
var functionAppName = 'func-${resourceToken}'

resource rg 'Microsoft.Resources/resourceGroups@2024-03-01' = {
  name: empty(resourceGroupName) ? 'rg-${environmentName}' : resourceGroupName
  location: location
  tags: tags
}

module identity './app/identity.bicep' = {
  name: 'identity'
  scope: rg
  params: {
    name: 'id-${resourceToken}'
    location: location
    tags: tags
  }
}

module monitoring './app/monitoring.bicep' = {
  name: 'monitoring'
  scope: rg
  params: {
    workspaceName: 'log-${resourceToken}'
    applicationInsightsName: 'appi-${resourceToken}'
    location: location
    tags: tags
  }
}

module storage './app/storage.bicep' = {
  name: 'storage'
  scope: rg
  params: {
    name: 'st${resourceToken}'
    location: location
    tags: tags
    deploymentContainerName: 'app-package'
    queueNames: queueNames
    tableNames: tableNames
  }
}

module keyVault './app/keyvault.bicep' = {
  name: 'keyvault'
  scope: rg
  params: {
    name: 'kv-${resourceToken}'
    location: location
    tags: tags
    softDeleteRetentionInDays: keyVaultSoftDeleteRetentionInDays
    dynamicsClientSecret: dynamicsClientSecret
    waveWebhookSecrets: waveWebhookSecrets
    waveApiToken: waveApiToken
  }
}

module rbac './app/rbac.bicep' = {
  name: 'rbac'
  scope: rg
  params: {
    principalId: identity.outputs.principalId
    storageAccountName: storage.outputs.name
    keyVaultName: keyVault.outputs.name
    applicationInsightsName: monitoring.outputs.applicationInsightsName
  }
}

module app './app/function.bicep' = {
  name: 'function'
  scope: rg
  params: {
    name: functionAppName
    planName: 'plan-${resourceToken}'
    location: location
    tags: tags
    identityName: identity.outputs.name
    storageAccountName: storage.outputs.name
    deploymentContainerName: storage.outputs.deploymentContainerName
    applicationInsightsName: monitoring.outputs.applicationInsightsName
    keyVaultName: keyVault.outputs.name
    dynamicsClientSecretUri: keyVault.outputs.dynamicsClientSecretUri
    waveWebhookSecretsUri: keyVault.outputs.waveWebhookSecretsUri
    waveApiTokenUri: keyVault.outputs.waveApiTokenUri
    dynamicsClientId: dynamicsClientId
    waveApiBaseUrl: waveApiBaseUrl
    waveReturnUrlPrefixes: waveReturnUrlPrefixes
    oauthRedirectUri: oauthRedirectUri
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
  // The app resolves its Key Vault references and reaches storage at first start: grant the roles first.
  dependsOn: [
    rbac
  ]
}

// Read by azd (written to .azure/<env>/.env) and by the commands in infra/README.md.
output AZURE_LOCATION string = location
output AZURE_TENANT_ID string = tenant().tenantId
output AZURE_RESOURCE_GROUP string = rg.name
output AZURE_FUNCTION_NAME string = app.outputs.name
output SERVICE_API_NAME string = app.outputs.name
output SERVICE_API_URI string = app.outputs.uri
output OAUTH_REDIRECT_URI string = app.outputs.oauthRedirectUri
output AZURE_KEY_VAULT_NAME string = keyVault.outputs.name
output AZURE_STORAGE_ACCOUNT_NAME string = storage.outputs.name
output AZURE_MANAGED_IDENTITY_CLIENT_ID string = identity.outputs.clientId
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.applicationInsightsName
