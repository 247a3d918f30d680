-- Outcome records that commit without waiting for their WAL flush, when the operator asks
-- for it (`database.outcome_commit = "relaxed"`).
--
-- `umgw_finish_batch_relaxed` is `umgw_finish_batch` in a transaction whose commit does not
-- wait for the WAL to reach the disk (`synchronous_commit = off` for that transaction only:
-- `set_config(..., true)`). The gateway calls it only for a statement that records
-- outcomes and nothing else; admissions, claims and every other write keep the server's
-- setting. A later durable commit flushes the WAL up to itself, so a relaxed outcome is
-- durable as soon as any admission or claim commits after it; a crash of PostgreSQL
-- itself (not of the gateway) may lose the outcomes of the last moments (at most three
-- times `wal_writer_delay`, 600 ms by default), and their pushes are then treated as if
-- their replica had died mid-send.
--
-- It has no `set` clause of its own: a function with one restores, on its exit, every
-- setting made with `set local` inside it, which would undo this one before the commit.
create function umgw_finish_batch_relaxed(p_rows jsonb)
returns setof text
language plpgsql
as $$
begin
    perform set_config('synchronous_commit', 'off', true);
    return query select id from umgw_finish_batch(p_rows) as id;
end;
$$;
