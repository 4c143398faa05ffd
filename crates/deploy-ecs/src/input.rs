//! The JSON bodies [`render_ecs`](trellis_deploy::render_ecs) renders, read into the SDK's
//! typed values. Every field `render_ecs` writes is mapped; a field of the wrong type is a
//! [`DeployError::Emit`] naming it (a bug, since both sides are ours).

use aws_sdk_ecs::Client;
use aws_sdk_ecs::error::SdkError;
use aws_sdk_ecs::operation::create_service::builders::CreateServiceFluentBuilder;
use aws_sdk_ecs::operation::register_task_definition::RegisterTaskDefinitionError;
use aws_sdk_ecs::operation::register_task_definition::RegisterTaskDefinitionOutput;
use aws_sdk_ecs::types::{
    ApplicationProtocol, AssignPublicIp, AwsVpcConfiguration, Compatibility, ContainerDefinition,
    DeploymentCircuitBreaker, DeploymentConfiguration, HealthCheck, KeyValuePair, LaunchType,
    NetworkConfiguration, NetworkMode, PortMapping, PropagateTags, Tag, TransportProtocol,
};
use serde_json::Value;
use trellis_deploy::DeployError;

fn bad(field: &str, want: &str) -> DeployError {
    DeployError::Emit(format!("ECS definition field {field} is not {want}"))
}

fn string(value: &Value, field: &str) -> Result<Option<String>, DeployError> {
    match value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad(field, "a string")),
    }
}

fn int(value: &Value, field: &str) -> Result<Option<i32>, DeployError> {
    match value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_i64()
            .and_then(|n| i32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| bad(field, "a 32-bit integer")),
    }
}

fn bool_field(value: &Value, field: &str) -> Result<Option<bool>, DeployError> {
    match value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| bad(field, "a boolean")),
    }
}

fn strings(value: &Value, field: &str) -> Result<Option<Vec<String>>, DeployError> {
    match value.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| bad(field, "a list of strings")),
        Some(_) => Err(bad(field, "a list of strings")),
    }
}

fn array<'v>(value: &'v Value, field: &str) -> Result<&'v [Value], DeployError> {
    match value.get(field) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(bad(field, "a list")),
    }
}

fn tags(value: &Value) -> Result<Vec<Tag>, DeployError> {
    array(value, "tags")?
        .iter()
        .map(|t| {
            Ok(Tag::builder()
                .set_key(string(t, "key")?)
                .set_value(string(t, "value")?)
                .build())
        })
        .collect()
}

fn container(value: &Value) -> Result<ContainerDefinition, DeployError> {
    let environment = array(value, "environment")?
        .iter()
        .map(|e| {
            Ok(KeyValuePair::builder()
                .set_name(string(e, "name")?)
                .set_value(string(e, "value")?)
                .build())
        })
        .collect::<Result<Vec<_>, DeployError>>()?;
    let ports = array(value, "portMappings")?
        .iter()
        .map(|p| {
            Ok(PortMapping::builder()
                .set_name(string(p, "name")?)
                .set_container_port(int(p, "containerPort")?)
                .set_host_port(int(p, "hostPort")?)
                .set_protocol(string(p, "protocol")?.map(|s| TransportProtocol::from(s.as_str())))
                .set_app_protocol(
                    string(p, "appProtocol")?.map(|s| ApplicationProtocol::from(s.as_str())),
                )
                .build())
        })
        .collect::<Result<Vec<_>, DeployError>>()?;
    let health = match value.get("healthCheck") {
        None | Some(Value::Null) => None,
        Some(check) => Some(
            HealthCheck::builder()
                .set_command(strings(check, "command")?)
                .set_interval(int(check, "interval")?)
                .set_timeout(int(check, "timeout")?)
                .set_retries(int(check, "retries")?)
                .set_start_period(int(check, "startPeriod")?)
                .build()
                .map_err(|e| DeployError::Emit(format!("ECS healthCheck: {e}")))?,
        ),
    };
    Ok(ContainerDefinition::builder()
        .set_name(string(value, "name")?)
        .set_image(string(value, "image")?)
        .set_essential(bool_field(value, "essential")?)
        .set_cpu(int(value, "cpu")?)
        .set_memory(int(value, "memory")?)
        .set_entry_point(strings(value, "entryPoint")?)
        .set_environment(Some(environment))
        .set_port_mappings((!ports.is_empty()).then_some(ports))
        .set_health_check(health)
        .build())
}

/// A `RegisterTaskDefinition` request read from the `taskDefinition` JSON of
/// [`render_ecs`](trellis_deploy::render_ecs), in the SDK's types.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskDefinitionInput {
    /// `family`.
    pub family: String,
    /// `cpu` (task level, CPU units as a string), Fargate only.
    pub cpu: Option<String>,
    /// `memory` (task level, MiB as a string), Fargate only.
    pub memory: Option<String>,
    /// `networkMode`.
    pub network_mode: Option<NetworkMode>,
    /// `requiresCompatibilities`.
    pub requires_compatibilities: Vec<Compatibility>,
    /// `executionRoleArn`.
    pub execution_role_arn: Option<String>,
    /// `containerDefinitions`.
    pub container_definitions: Vec<ContainerDefinition>,
    /// `tags`.
    pub tags: Vec<Tag>,
}

/// Reads the `taskDefinition` JSON of [`render_ecs`](trellis_deploy::render_ecs) into a
/// [`TaskDefinitionInput`].
pub fn task_definition_input(json: &Value) -> Result<TaskDefinitionInput, DeployError> {
    Ok(TaskDefinitionInput {
        family: string(json, "family")?.ok_or_else(|| bad("family", "present"))?,
        cpu: string(json, "cpu")?,
        memory: string(json, "memory")?,
        network_mode: string(json, "networkMode")?.map(|s| NetworkMode::from(s.as_str())),
        requires_compatibilities: strings(json, "requiresCompatibilities")?
            .unwrap_or_default()
            .iter()
            .map(|s| Compatibility::from(s.as_str()))
            .collect(),
        execution_role_arn: string(json, "executionRoleArn")?,
        container_definitions: array(json, "containerDefinitions")?
            .iter()
            .map(container)
            .collect::<Result<_, _>>()?,
        tags: tags(json)?,
    })
}

impl TaskDefinitionInput {
    pub(crate) async fn send(
        &self,
        client: &Client,
    ) -> Result<RegisterTaskDefinitionOutput, SdkError<RegisterTaskDefinitionError>> {
        client
            .register_task_definition()
            .family(&self.family)
            .set_cpu(self.cpu.clone())
            .set_memory(self.memory.clone())
            .set_network_mode(self.network_mode.clone())
            .set_requires_compatibilities(Some(self.requires_compatibilities.clone()))
            .set_execution_role_arn(self.execution_role_arn.clone())
            .set_container_definitions(Some(self.container_definitions.clone()))
            .set_tags((!self.tags.is_empty()).then(|| self.tags.clone()))
            .send()
            .await
    }
}

/// A `CreateService` request read from the `service` JSON; its `taskDefinition` is replaced
/// by the ARN just registered.
#[derive(Debug, Clone)]
pub(crate) struct ServiceInput {
    name: String,
    pub(crate) cluster: Option<String>,
    pub(crate) desired_count: i32,
    launch_type: Option<LaunchType>,
    deployment: Option<DeploymentConfiguration>,
    propagate_tags: Option<PropagateTags>,
    managed_tags: Option<bool>,
    network: Option<NetworkConfiguration>,
    tags: Vec<Tag>,
}

impl ServiceInput {
    pub(crate) fn from_json(json: &Value) -> Result<ServiceInput, DeployError> {
        let deployment = match json.get("deploymentConfiguration") {
            None | Some(Value::Null) => None,
            Some(d) => Some(
                DeploymentConfiguration::builder()
                    .set_minimum_healthy_percent(int(d, "minimumHealthyPercent")?)
                    .set_maximum_percent(int(d, "maximumPercent")?)
                    .set_deployment_circuit_breaker(match d.get("deploymentCircuitBreaker") {
                        None | Some(Value::Null) => None,
                        Some(b) => Some(
                            DeploymentCircuitBreaker::builder()
                                .set_enable(bool_field(b, "enable")?)
                                .set_rollback(bool_field(b, "rollback")?)
                                .build(),
                        ),
                    })
                    .build(),
            ),
        };
        let network = match json
            .get("networkConfiguration")
            .and_then(|n| n.get("awsvpcConfiguration"))
        {
            None | Some(Value::Null) => None,
            Some(vpc) => Some(
                NetworkConfiguration::builder()
                    .awsvpc_configuration(
                        AwsVpcConfiguration::builder()
                            .set_subnets(Some(strings(vpc, "subnets")?.unwrap_or_default()))
                            .set_security_groups(strings(vpc, "securityGroups")?)
                            .set_assign_public_ip(
                                string(vpc, "assignPublicIp")?
                                    .map(|s| AssignPublicIp::from(s.as_str())),
                            )
                            .build()
                            .map_err(|e| {
                                DeployError::Emit(format!("ECS awsvpcConfiguration: {e}"))
                            })?,
                    )
                    .build(),
            ),
        };
        Ok(ServiceInput {
            name: string(json, "serviceName")?.ok_or_else(|| bad("serviceName", "present"))?,
            cluster: string(json, "cluster")?,
            desired_count: int(json, "desiredCount")?.unwrap_or(1),
            launch_type: string(json, "launchType")?.map(|s| LaunchType::from(s.as_str())),
            deployment,
            propagate_tags: string(json, "propagateTags")?.map(|s| PropagateTags::from(s.as_str())),
            managed_tags: bool_field(json, "enableECSManagedTags")?,
            network,
            tags: tags(json)?,
        })
    }

    pub(crate) fn create(
        &self,
        client: &Client,
        task_definition_arn: &str,
    ) -> CreateServiceFluentBuilder {
        client
            .create_service()
            .service_name(&self.name)
            .set_cluster(self.cluster.clone())
            .task_definition(task_definition_arn)
            .desired_count(self.desired_count)
            .set_launch_type(self.launch_type.clone())
            .set_deployment_configuration(self.deployment.clone())
            .set_propagate_tags(self.propagate_tags.clone())
            .set_enable_ecs_managed_tags(self.managed_tags)
            .set_network_configuration(self.network.clone())
            .set_tags((!self.tags.is_empty()).then(|| self.tags.clone()))
    }
}
