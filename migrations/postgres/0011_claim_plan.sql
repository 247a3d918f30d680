-- The claim's row source must be the ordered scan of pushes_due_idx that stops after
-- p_limit * 4 rows. When the queue fills faster than autovacuum analyzes the table (a burst
-- of asynchronous pushes into a young or large table), the statistics say almost no row is
-- due, and the planner instead read every due row through a bitmap of two indexes and
-- sorted them: 38-70 ms per claim with 25,000 queued, against 0.13 ms for the ordered scan,
-- which cut the drain to a few hundred pushes per second. Without sorts the ordered scan is
-- the only plan left, whatever the statistics say.
--
-- A later migration that replaces this function with `create or replace` drops this
-- setting; it must be set again (the store tests check it).
alter function umgw_claim_deliveries(integer, bigint, text[], text[], integer[])
    set enable_sort = off;
