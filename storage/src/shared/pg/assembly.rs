//! Assembly journals: the multipart upload an assembly started and the parts the store
//! answered (tables `bitsd_assemblies` and `bitsd_assembly_parts`, see the schema's
//! `ASSEMBLY_JOURNALS`), so that a node killed while it completes an upload leaves the next
//! attempt something to go on with.

use bitsd_protocol::SessionId;
use uuid::Uuid;

use super::sessions::to_i64;
use super::{pg_error, PgStateStore};
use crate::{now_millis, StorageError};

/// A part recorded for an assembly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedPart {
    /// Its number (1-based).
    pub number: u32,
    /// First byte of the upload it holds.
    pub start: u64,
    /// One past its last byte.
    pub end: u64,
    /// The store's ETag for it.
    pub etag: String,
}

/// A multipart upload recorded for an assembly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedAssembly {
    /// The key the upload completes at.
    pub object_key: String,
    /// The store's id of the upload.
    pub upload_id: String,
    /// Its parts recorded so far.
    pub parts: Vec<RecordedPart>,
}

/// Now, in milliseconds since the epoch, by PostgreSQL's clock: leases are set and compared
/// by one clock, whatever the nodes' clocks say.
const PG_NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// What [`PgStateStore::claim_assembly`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssemblyClaim {
    /// The assembly, now held by the caller.
    Taken(RecordedAssembly),
    /// Another attempt holds it.
    Held,
    /// None is recorded.
    None,
}

/// The assembly `upload_id` at `object_key` with its recorded parts (read after the upload:
/// parts of a later upload that replaced it are not mixed in; they are recorded only while
/// their upload is the slot's).
async fn with_parts(
    conn: &tokio_postgres::Client,
    id: &SessionId,
    slot: &str,
    object_key: String,
    upload_id: String,
) -> Result<RecordedAssembly, StorageError> {
    let parts = conn
        .query(
            "SELECT p.part_number, p.start_offset, p.end_offset, p.etag
               FROM bitsd_assembly_parts p JOIN bitsd_assemblies a USING (session_id, slot)
              WHERE p.session_id = $1 AND p.slot = $2 AND a.upload_id = $3",
            &[id.as_uuid(), &slot, &upload_id],
        )
        .await
        .map_err(pg_error)?
        .iter()
        .map(|r| RecordedPart {
            number: r.get::<_, i32>(0) as u32,
            start: r.get::<_, i64>(1) as u64,
            end: r.get::<_, i64>(2) as u64,
            etag: r.get(3),
        })
        .collect();
    Ok(RecordedAssembly {
        object_key,
        upload_id,
        parts,
    })
}

impl PgStateStore {
    /// The assembly recorded for session `id` at `slot`, with its parts.
    pub async fn assembly(
        &self,
        id: &SessionId,
        slot: &str,
    ) -> Result<Option<RecordedAssembly>, StorageError> {
        self.timed(async {
            let conn = self.conn().await?;
            let Some(row) = conn
                .query_opt(
                    "SELECT object_key, upload_id FROM bitsd_assemblies
                      WHERE session_id = $1 AND slot = $2",
                    &[id.as_uuid(), &slot],
                )
                .await
                .map_err(pg_error)?
            else {
                return Ok(None);
            };
            with_parts(&conn, id, slot, row.get(0), row.get(1))
                .await
                .map(Some)
        })
        .await
    }

    /// Records the upload `upload_id` at `object_key` for session `id` at `slot`, held by
    /// attempt `holder` for `lease_ms` from now (PostgreSQL's clock), unless one is recorded
    /// already: then false (the caller's upload is not recorded; it aborts it and claims the
    /// other). Fails when the session has no row any more.
    pub async fn start_assembly(
        &self,
        id: &SessionId,
        slot: &str,
        assembly: (&str, &str),
        holder: &Uuid,
        lease_ms: i64,
    ) -> Result<bool, StorageError> {
        let (object_key, upload_id) = assembly;
        let now = to_i64(now_millis(), "time")?;
        let inserted = self
            .execute(
                &format!(
                    "INSERT INTO bitsd_assemblies
                            (session_id, slot, object_key, upload_id, created_ms, holder, held_until_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, {PG_NOW_MS} + $7) ON CONFLICT DO NOTHING"
                ),
                &[id.as_uuid(), &slot, &object_key, &upload_id, &now, holder, &lease_ms],
            )
            .await?;
        Ok(inserted == 1)
    }

    /// Takes the assembly recorded for session `id` at `slot` for attempt `holder`, for
    /// `lease_ms` from now, when no other attempt holds it (its lease ran out, or it let go).
    pub async fn claim_assembly(
        &self,
        id: &SessionId,
        slot: &str,
        holder: &Uuid,
        lease_ms: i64,
    ) -> Result<AssemblyClaim, StorageError> {
        self.timed(async {
            let conn = self.conn().await?;
            let taken = conn
                .query_opt(
                    &format!(
                        "UPDATE bitsd_assemblies SET holder = $3, held_until_ms = {PG_NOW_MS} + $4
                          WHERE session_id = $1 AND slot = $2
                            AND (holder = $3 OR holder IS NULL OR held_until_ms < {PG_NOW_MS})
                         RETURNING object_key, upload_id"
                    ),
                    &[id.as_uuid(), &slot, holder, &lease_ms],
                )
                .await
                .map_err(pg_error)?;
            if let Some(row) = taken {
                return with_parts(&conn, id, slot, row.get(0), row.get(1))
                    .await
                    .map(AssemblyClaim::Taken);
            }
            let held = conn
                .query_opt(
                    "SELECT 1 FROM bitsd_assemblies WHERE session_id = $1 AND slot = $2",
                    &[id.as_uuid(), &slot],
                )
                .await
                .map_err(pg_error)?;
            Ok(if held.is_some() {
                AssemblyClaim::Held
            } else {
                AssemblyClaim::None
            })
        })
        .await
    }

    /// Extends attempt `holder`'s lease on the assembly of session `id` at `slot` to
    /// `lease_ms` from now; false when it holds it no more (another attempt took it over, or
    /// it was forgotten).
    pub async fn renew_assembly(
        &self,
        id: &SessionId,
        slot: &str,
        holder: &Uuid,
        lease_ms: i64,
    ) -> Result<bool, StorageError> {
        let n = self
            .execute(
                &format!(
                    "UPDATE bitsd_assemblies SET held_until_ms = {PG_NOW_MS} + $4
                      WHERE session_id = $1 AND slot = $2 AND holder = $3"
                ),
                &[id.as_uuid(), &slot, holder, &lease_ms],
            )
            .await?;
        Ok(n == 1)
    }

    /// Ends attempt `holder`'s lease on the assembly of session `id` at `slot` now (it
    /// stopped, leaving the assembly to the next attempt).
    pub async fn release_assembly(
        &self,
        id: &SessionId,
        slot: &str,
        holder: &Uuid,
    ) -> Result<(), StorageError> {
        self.execute(
            "UPDATE bitsd_assemblies SET held_until_ms = 0
              WHERE session_id = $1 AND slot = $2 AND holder = $3",
            &[id.as_uuid(), &slot, holder],
        )
        .await?;
        Ok(())
    }

    /// Records a part of the upload `upload_id` sent by attempt `holder`; false (nothing
    /// recorded) when the slot records another upload or none, or another attempt holds it.
    pub async fn assembly_part_done(
        &self,
        id: &SessionId,
        slot: &str,
        (upload_id, holder): (&str, &Uuid),
        part: &RecordedPart,
    ) -> Result<bool, StorageError> {
        let number = i32::try_from(part.number).map_err(|_| {
            StorageError::StateStore(format!("part number {} out of range", part.number))
        })?;
        let (start, end) = (
            to_i64(part.start, "part start")?,
            to_i64(part.end, "part end")?,
        );
        let n = self
            .execute(
                "INSERT INTO bitsd_assembly_parts
                        (session_id, slot, part_number, start_offset, end_offset, etag)
                 SELECT $1, $2, $4, $5, $6, $7 FROM bitsd_assemblies
                  WHERE session_id = $1 AND slot = $2 AND upload_id = $3 AND holder = $8
                 ON CONFLICT (session_id, slot, part_number) DO UPDATE
                    SET start_offset = excluded.start_offset,
                        end_offset = excluded.end_offset,
                        etag = excluded.etag",
                &[
                    id.as_uuid(),
                    &slot,
                    &upload_id,
                    &number,
                    &start,
                    &end,
                    &part.etag,
                    holder,
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// Forgets the upload `upload_id` of session `id` at `slot` (and its parts).
    pub async fn forget_assembly(
        &self,
        id: &SessionId,
        slot: &str,
        upload_id: &str,
    ) -> Result<(), StorageError> {
        self.execute(
            "DELETE FROM bitsd_assemblies
              WHERE session_id = $1 AND slot = $2 AND upload_id = $3",
            &[id.as_uuid(), &slot, &upload_id],
        )
        .await?;
        Ok(())
    }

    /// Every upload still recorded for session `id`: (its slot, its key, its id).
    pub async fn session_assemblies(
        &self,
        id: &SessionId,
    ) -> Result<Vec<(String, String, String)>, StorageError> {
        let rows = self
            .query(
                "SELECT slot, object_key, upload_id FROM bitsd_assemblies WHERE session_id = $1",
                &[id.as_uuid()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }
}
