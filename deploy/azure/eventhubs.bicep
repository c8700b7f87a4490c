// The Azure side of cloud-hub's Event Hubs ingress (docs/hub.md, "Three ingress paths" and
// "Kafka / Event Hubs ingest"): IoT Hub routes the agents' batches to an event hub; every
// cloud-hub replica reads it through the namespace's Kafka endpoint (deploy/aks/components/eventhubs).
//
//   az deployment group create -g <resource group> -f deploy/azure/eventhubs.bicep \
//     -p namespaceName=<ns> iotHubName=<iot hub> keyVaultName=<vault>
//
// Creates: the Event Hubs namespace (Standard: the Kafka endpoint needs Standard or above), the
// event hub `vigil-batches` with its partitions and retention, the consumer group `vigil-hub`,
// a send-only rule for IoT Hub and a listen-only rule for cloud-hub (its connection string
// written to Key Vault as `vigil-hub-eventhubs-connection`), and the IoT Hub with the custom
// endpoint and the route of the agents' batches.
//
// The IoT Hub's routing is part of the IoT Hub resource: deploying this over an existing IoT
// Hub sets its sku to the parameters below and replaces its endpoints and routes with these.
// For an IoT Hub that has routes of its own, add them here or use the az commands in docs/hub.md.
//
// Not compiled here (no Bicep CLI on the build machine): tests/tests/deploy_aks.rs parses it
// (pycep-parser's Bicep grammar: syntax, not types), checks what it declares and that its names
// match the hub's config and the docs. Before the first deployment:
//   az bicep build -f deploy/azure/eventhubs.bicep
//   az deployment group what-if -g <resource group> -f deploy/azure/eventhubs.bicep -p ...

@description('Region of the resources.')
param location string = resourceGroup().location

@description('Event Hubs namespace; the hub\'s kafka.brokers is {namespaceName}.servicebus.windows.net:9093.')
param namespaceName string = 'vigil-eh'

@description('Throughput units of the Standard namespace (1 TU: 1 MB/s or 1000 events/s in).')
@minValue(1)
@maxValue(40)
param throughputUnits int = 1

@description('The event hub, the Kafka topic (kafka.topic in hub.toml).')
param eventHubName string = 'vigil-batches'

@description('Partitions: at least the hub\'s maximum replicas (hpa.yaml: 8); fixed after creation on Standard.')
@minValue(1)
@maxValue(32)
param partitionCount int = 8

@description('How long the event hub keeps records (hours; Standard: at most 168): the longest hub outage without loss.')
@minValue(1)
@maxValue(168)
param retentionHours int = 168

@description('Consumer group reserved for cloud-hub.')
param consumerGroupName string = 'vigil-hub'

@description('The IoT Hub the agents publish to (uplink.iothub).')
param iotHubName string = 'vigil-iothub'

@description('IoT Hub sku (S1, S2, S3; B1-B3 also route device messages).')
param iotHubSku string = 'S1'

@description('IoT Hub units.')
@minValue(1)
param iotHubCapacity int = 1

@description('Key Vault the AKS SecretProviderClass reads (keyvaultName in deploy/aks).')
param keyVaultName string = 'vigil-kv'

@description('Route query: the agents\' batches carry the content type application/x-protobuf ($.ct in their topic).')
param routeCondition string = '$contentType = \'application/x-protobuf\''

resource namespace 'Microsoft.EventHub/namespaces@2024-01-01' = {
  name: namespaceName
  location: location
  sku: {
    name: 'Standard'
    tier: 'Standard'
    capacity: throughputUnits
  }
  properties: {
    minimumTlsVersion: '1.2'
    // SAS keys stay enabled: the hub authenticates with SASL PLAIN and a connection string.
    disableLocalAuth: false
  }
}

resource eventHub 'Microsoft.EventHub/namespaces/eventhubs@2024-01-01' = {
  parent: namespace
  name: eventHubName
  properties: {
    partitionCount: partitionCount
    retentionDescription: {
      cleanupPolicy: 'Delete'
      retentionTimeInHours: retentionHours
    }
  }
}

resource consumerGroup 'Microsoft.EventHub/namespaces/eventhubs/consumergroups@2024-01-01' = {
  parent: eventHub
  name: consumerGroupName
  properties: {
    userMetadata: 'cloud-hub [kafka] source; offsets are kept in the hub database'
  }
}

// IoT Hub's endpoint may only send to this event hub.
resource sendRule 'Microsoft.EventHub/namespaces/eventhubs/authorizationRules@2024-01-01' = {
  parent: eventHub
  name: 'iothub-send'
  properties: {
    rights: [
      'Send'
    ]
  }
}

// cloud-hub may only read this event hub.
resource listenRule 'Microsoft.EventHub/namespaces/eventhubs/authorizationRules@2024-01-01' = {
  parent: eventHub
  name: 'vigil-hub-listen'
  properties: {
    rights: [
      'Listen'
    ]
  }
}

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: keyVaultName
}

// The listen-only connection string for the SecretProviderClass cloud-hub-keyvault-eventhubs.
resource connectionSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: keyVault
  name: 'vigil-hub-eventhubs-connection'
  properties: {
    contentType: 'text/plain'
    value: listenRule.listKeys().primaryConnectionString
  }
}

resource iotHub 'Microsoft.Devices/IotHubs@2023-06-30' = {
  name: iotHubName
  location: location
  sku: {
    name: iotHubSku
    capacity: iotHubCapacity
  }
  properties: {
    routing: {
      endpoints: {
        eventHubs: [
          {
            name: 'vigil-batches'
            connectionString: sendRule.listKeys().primaryConnectionString
            subscriptionId: subscription().subscriptionId
            resourceGroup: resourceGroup().name
          }
        ]
      }
      routes: [
        {
          name: 'vigil-batches'
          source: 'DeviceMessages'
          condition: routeCondition
          endpointNames: [
            'vigil-batches'
          ]
          isEnabled: true
        }
      ]
      // Device messages that match no route (anything but the agents' batches) still reach
      // the built-in endpoint.
      fallbackRoute: {
        name: '$fallback'
        source: 'DeviceMessages'
        condition: 'true'
        endpointNames: [
          'events'
        ]
        isEnabled: true
      }
    }
  }
}

output kafkaBrokers string = '${namespace.name}.servicebus.windows.net:9093'
output kafkaTopic string = eventHub.name
output consumerGroup string = consumerGroup.name
output keyVaultSecret string = connectionSecret.name
