//! Assembly journals: the multipart upload an assembly started and the parts the store
//! answered (tables `bitsd_assemblies` and `bitsd_assembly_parts`, see the schema's
//! `ASSEMBLY_JOURNALS`), so that a node killed while it completes an upload leaves the next
//! attempt something to go on with.

use bitsd_protocol::SessionId;

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
            let upload_id: String = row.get(1);
            // Read after the upload: parts of a later upload that replaced it are not mixed in
            // (they are recorded only while their upload is the slot's).
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
            Ok(Some(RecordedAssembly {
                object_key: row.get(0),
                upload_id,
                parts,
            }))
        })
        .await
    }

    /// Records the upload `upload_id` at `object_key` for session `id` at `slot`, unless one
    /// is recorded already; returns the one recorded (ours, or the other attempt's with its
    /// parts). Fails when the session has no row any more.
    pub async fn start_assembly(
        &self,
        id: &SessionId,
        slot: &str,
        object_key: &str,
        upload_id: &str,
    ) -> Result<RecordedAssembly, StorageError> {
        let now = to_i64(now_millis(), "time")?;
        let inserted = self
            .timed(async {
                let conn = self.conn().await?;
                conn.execute(
                    "INSERT INTO bitsd_assemblies (session_id, slot, object_key, upload_id, created_ms)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[id.as_uuid(), &slot, &object_key, &upload_id, &now],
                )
                .await
                .map_err(pg_error)
            })
            .await?;
        if inserted == 1 {
            return Ok(RecordedAssembly {
                object_key: object_key.to_string(),
                upload_id: upload_id.to_string(),
                parts: Vec::new(),
            });
        }
        self.assembly(id, slot).await?.ok_or_else(|| {
            StorageError::StateStoreUnreachable(format!(
                "session {id}: another attempt's assembly was recorded and forgotten at once; try again"
            ))
        })
    }

    /// Records a part of the upload `upload_id` (nothing when the slot records another
    /// upload or none).
    pub async fn assembly_part_done(
        &self,
        id: &SessionId,
        slot: &str,
        upload_id: &str,
        part: &RecordedPart,
    ) -> Result<(), StorageError> {
        let number = i32::try_from(part.number).map_err(|_| {
            StorageError::StateStore(format!("part number {} out of range", part.number))
        })?;
        let (start, end) = (
            to_i64(part.start, "part start")?,
            to_i64(part.end, "part end")?,
        );
        self.timed(async {
            let conn = self.conn().await?;
            conn.execute(
                "INSERT INTO bitsd_assembly_parts
                        (session_id, slot, part_number, start_offset, end_offset, etag)
                 SELECT $1, $2, $4, $5, $6, $7 FROM bitsd_assemblies
                  WHERE session_id = $1 AND slot = $2 AND upload_id = $3
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
                ],
            )
            .await
            .map_err(pg_error)?;
            Ok(())
        })
        .await
    }

    /// Forgets the upload `upload_id` of session `id` at `slot` (and its parts).
    pub async fn forget_assembly(
        &self,
        id: &SessionId,
        slot: &str,
        upload_id: &str,
    ) -> Result<(), StorageError> {
        self.timed(async {
            let conn = self.conn().await?;
            conn.execute(
                "DELETE FROM bitsd_assemblies
                  WHERE session_id = $1 AND slot = $2 AND upload_id = $3",
                &[id.as_uuid(), &slot, &upload_id],
            )
            .await
            .map_err(pg_error)?;
            Ok(())
        })
        .await
    }

    /// Every upload still recorded for session `id`: (its slot, its key, its id).
    pub async fn session_assemblies(
        &self,
        id: &SessionId,
    ) -> Result<Vec<(String, String, String)>, StorageError> {
        self.timed(async {
            let conn = self.conn().await?;
            let rows = conn
                .query(
                    "SELECT slot, object_key, upload_id FROM bitsd_assemblies WHERE session_id = $1",
                    &[id.as_uuid()],
                )
                .await
                .map_err(pg_error)?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
        })
        .await
    }
}
