//! `[object_store] service = "azure"`: the farm's bytes in an Azure Blob Storage container.
//!
//! Everything the farm does with a store goes through `object_store`'s traits
//! (`ObjectStore` for objects, `MultipartStore` for an assembly's parts), which its Azure
//! client has too: a multipart upload is a blob's block list, each part a block, and the
//! completion commits the list. Azure has no upload id (the client's is empty): the
//! assembly journal and its lease work as they do on S3, since only one attempt at a time
//! sends an assembly's parts, and a session's publish marker keeps two sessions from
//! assembling one destination at once; blocks an attempt sent and did not record are dropped
//! by the blob's next commit, or by Azure after 7 days. What is S3's alone is not used:
//! part copies (`UploadPartCopy`), cut-through fragment PUTs, payload signing and presigned
//! reply URLs; a table that asks for one of them is refused at start.

use object_store::azure::{AzureConfigKey, MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::{ClientOptions, RetryConfig};

use super::config::ObjectStoreConfig;

/// What an Azure table must not set, the message naming the key and what to do.
pub(super) fn check(config: &ObjectStoreConfig) -> Result<(), String> {
    let s3_only = |key: &str, why: &str| {
        Err(format!(
            "[object_store] {key} is for S3 stores, not for service = \"azure\" ({why}): \
             remove it"
        ))
    };
    if config.access_key_id.is_some() {
        return s3_only(
            "access_key_id",
            "the storage account goes in account, its key in secret_access_key",
        );
    }
    if config.region.is_some() {
        return s3_only("region", "the account's URL says where it is");
    }
    if config.session_token.is_some() {
        return s3_only("session_token", "use the account's key");
    }
    if config.virtual_hosted_style {
        return s3_only(
            "virtual_hosted_style",
            "endpoint says how to reach the account",
        );
    }
    if config.server_side_copy == Some(true) {
        return s3_only("server_side_copy = true", "assemblies stream their parts");
    }
    if config.stream_fragments == Some(true) {
        return s3_only(
            "stream_fragments = true",
            "fragments are sent after their last byte",
        );
    }
    if config.sign_payloads.is_some() {
        return s3_only(
            "sign_payloads",
            "Azure's requests are signed with the account's key",
        );
    }
    if config.presigned_reply_secs.is_some_and(|s| s > 0) {
        return s3_only(
            "presigned_reply_secs",
            "replies are served through the nodes",
        );
    }
    Ok(())
}

/// The Azure client builder `config` describes: the environment's settings
/// (`AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_ENDPOINT`, ...),
/// then the table's (container `bucket`, storage account `account`, its key
/// `secret_access_key`, `endpoint` for Azurite or another cloud) over them.
fn builder(config: &ObjectStoreConfig) -> MicrosoftAzureBuilder {
    let mut builder = MicrosoftAzureBuilder::from_env().with_container_name(&config.bucket);
    if let Some(account) = &config.account {
        builder = builder.with_account(account);
    }
    if let Some(key) = &config.secret_access_key {
        builder = builder.with_access_key(key);
    }
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    builder
}

/// The blob endpoint the client of `config` sends to, as its builder reads it: the
/// endpoint (the table's, else the environment's), else the account's URL; and whether the
/// table named it (`false`: it came from the environment). `None` without an account.
pub(super) fn endpoint(config: &ObjectStoreConfig) -> Option<(String, bool)> {
    let builder = builder(config);
    if let Some(endpoint) = builder.get_config_value(&AzureConfigKey::Endpoint) {
        return Some((endpoint, config.endpoint.is_some()));
    }
    let account = builder.get_config_value(&AzureConfigKey::AccountName)?;
    Some((
        format!("https://{account}.blob.core.windows.net"),
        config.account.is_some(),
    ))
}

/// The Azure client `config` describes ([`builder`]), with `client` and `retry`; the error
/// says why not.
pub(super) fn build(
    config: &ObjectStoreConfig,
    client: ClientOptions,
    retry: RetryConfig,
) -> Result<MicrosoftAzure, String> {
    builder(config)
        .with_client_options(client)
        .with_retry(retry)
        .build()
        .map_err(|e| format!("{e}; set account (or AZURE_STORAGE_ACCOUNT_NAME)"))
}
