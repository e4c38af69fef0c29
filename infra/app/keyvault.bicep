// Key Vault for the static secrets (read by the app through Key Vault references) and, at run time, the
// per-connection MSAL token caches the app writes. RBAC only (no access policies); soft delete and purge
// protection stay on, so a deleted secret or vault can always be recovered within the retention period.
param name string
param location string
param tags object

@minValue(7)
@maxValue(90)
param softDeleteRetentionInDays int = 90

@secure()
param dynamicsClientSecret string

@secure()
param waveWebhookSecrets string

@secure()
param waveApiToken string

resource vault 'Microsoft.KeyVault/vaults@2024-11-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: softDeleteRetentionInDays
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource dynamicsClientSecretSecret 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = {
  parent: vault
  name: 'dynamics-client-secret'
  properties: {
    value: dynamicsClientSecret
    contentType: 'text/plain'
  }
}

resource waveWebhookSecretsSecret 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = {
  parent: vault
  name: 'wave-webhook-secrets'
  properties: {
    value: waveWebhookSecrets
    contentType: 'text/plain'
  }
}

resource waveApiTokenSecret 'Microsoft.KeyVault/vaults/secrets@2024-11-01' = {
  parent: vault
  name: 'wave-api-token'
  properties: {
    value: waveApiToken
    contentType: 'text/plain'
  }
}

output name string = vault.name
// Versioned URIs: a new value (a new version) changes the app setting, which restarts the app on the
// new value at once instead of after the platform's up-to-24-hour reference refresh.
output dynamicsClientSecretUri string = dynamicsClientSecretSecret.properties.secretUriWithVersion
output waveWebhookSecretsUri string = waveWebhookSecretsSecret.properties.secretUriWithVersion
output waveApiTokenUri string = waveApiTokenSecret.properties.secretUriWithVersion
